"""The CARLA 0.9.11 semantic tags: class names and the colour palette."""

import numpy as np

# Index i is the class index stored in channel 0 of a CARLA mask PNG.
CLASS_NAMES = (
    'Unlabeled', 'Building', 'Fence', 'Other', 'Pedestrian', 'Pole', 'RoadLine', 'Road',
    'SideWalk', 'Vegetation', 'Vehicles', 'Wall', 'TrafficSign', 'Sky', 'Ground', 'Bridge',
    'RailTrack', 'GuardRail', 'TrafficLight', 'Static', 'Dynamic', 'Water', 'Terrain',
)
NUM_CLASSES = len(CLASS_NAMES)

# CARLA's own CityScapes-style palette for these tags (uint8 RGB).
PALETTE = np.array([
    (0, 0, 0), (70, 70, 70), (100, 40, 40), (55, 90, 80), (220, 20, 60), (153, 153, 153),
    (157, 234, 50), (128, 64, 128), (244, 35, 232), (107, 142, 35), (0, 0, 142),
    (102, 102, 156), (220, 220, 0), (70, 130, 180), (81, 0, 81), (150, 100, 100),
    (230, 150, 140), (180, 165, 180), (250, 170, 30), (110, 190, 160), (170, 120, 50),
    (45, 60, 150), (145, 170, 100),
], dtype=np.uint8)


def class_name(index: int) -> str:
  return CLASS_NAMES[index] if 0 <= index < NUM_CLASSES else f'class{index}'
