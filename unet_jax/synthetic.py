r"""Procedural road scenes in the CARLA on-disk format, for demos and tests.

    python -m unet_jax.synthetic --output=data/synthetic --num_scenes=500 --seed=0

A pinhole camera 1.2-2 m above a flat world looks along a straight or gently
curving road. Every element is placed in metres and projected, so vehicles,
pedestrians, poles and facades shrink with distance and the road narrows to
a vanishing point. Classes carry informative but varied colours and textures
(windowed facades, leafy vegetation, striped fences, dashed lane markings),
and each scene draws its own lighting, palette and sensor noise, so a model
has to learn appearance and layout, not a fixed colour table.

Frames come in recording blocks like CARLA's: names are six digits, the
first three the block. Frames of one block share a layout seen from a camera
that moves forward a few metres per frame, so near-duplicates stay inside
one block and a split by block does not leak.
"""

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import os
import pathlib

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from unet_jax import carla_files
from unet_jax import cli
from unet_jax import errors

# CARLA 0.9.11 tags (unet_jax.classes.CLASS_NAMES).
BUILDING, FENCE, OTHER, PEDESTRIAN, POLE, ROADLINE, ROAD, SIDEWALK = 1, 2, 3, 4, 5, 6, 7, 8
VEGETATION, VEHICLES, WALL, TRAFFIC_SIGN, SKY, GROUND = 9, 10, 11, 12, 13, 14
GUARDRAIL, TRAFFIC_LIGHT, STATIC, TERRAIN = 17, 18, 19, 22

FRAMES_PER_RECORDING = 4
FRAME_ADVANCE_M = 1.5  # camera motion between consecutive frames of a recording


@dataclasses.dataclass
class _Canvas:
  """Colour, label and texture-strength layers painted back to front."""
  colour: np.ndarray  # float32 [H, W, 3], 0..255 before lighting
  label: np.ndarray  # uint8 [H, W]
  grain: np.ndarray  # float32 [H, W]: amplitude of fine texture noise

  def paint(self, rows: slice, cols: slice, where: np.ndarray, label: int,
            colour: np.ndarray, grain: float) -> None:
    colour_view = self.colour[rows, cols]
    colour_view[where] = colour if np.ndim(colour) == 1 else colour[where]
    self.label[rows, cols][where] = label
    self.grain[rows, cols][where] = grain


@dataclasses.dataclass(frozen=True)
class _Camera:
  height_px: int
  width_px: int
  horizon: float  # image row of the horizon
  centre_x: float  # image column of the vanishing point
  focal: float  # pixels per metre at one metre
  elevation: float  # metres above the road

  def row_of_ground(self, z):
    return self.horizon + self.focal * self.elevation / z

  def column(self, x, z):
    return self.centre_x + self.focal * x / z


def _clip_box(top, bottom, left, right, shape):
  rows = slice(max(int(np.floor(top)), 0), min(int(np.ceil(bottom)) + 1, shape[0]))
  cols = slice(max(int(np.floor(left)), 0), min(int(np.ceil(right)) + 1, shape[1]))
  if rows.start >= rows.stop or cols.start >= cols.stop:
    return None
  return rows, cols


def _hsv_to_rgb(h, s, v):
  """Scalar HSV in [0, 1] -> RGB in 0..255."""
  i = int(h * 6) % 6
  f = h * 6 - int(h * 6)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return np.array(rgb, np.float32) * 255


def _jitter(rng, colour, amount=12.0):
  return np.clip(colour + rng.normal(0, amount, 3), 0, 255).astype(np.float32)


def _palette(rng) -> dict[str, np.ndarray]:
  """Per-scene base colours: informative per class, varied across scenes."""
  road_v = rng.uniform(55, 115)
  return {
      'road': np.array([road_v, road_v, road_v * rng.uniform(0.95, 1.1)], np.float32),
      'sidewalk': _hsv_to_rgb(rng.uniform(0, 0.12), rng.uniform(0.0, 0.25), rng.uniform(0.55, 0.8)),
      'line': (np.array([235, 235, 230], np.float32) if rng.random() < 0.7 else
               np.array([230, 190, 40], np.float32)),
      'terrain': _hsv_to_rgb(rng.uniform(0.08, 0.2), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.6)),
      'vegetation': _hsv_to_rgb(rng.uniform(0.2, 0.38), rng.uniform(0.45, 0.85), rng.uniform(0.2, 0.5)),
      'sky_top': (_hsv_to_rgb(rng.uniform(0.55, 0.63), rng.uniform(0.35, 0.75), rng.uniform(0.7, 0.95))
                  if rng.random() < 0.75 else
                  _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.1), rng.uniform(0.6, 0.85))),
      'sky_horizon': _hsv_to_rgb(rng.uniform(0.0, 0.65), rng.uniform(0.0, 0.25), rng.uniform(0.8, 1.0)),
      'wall': _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.2), rng.uniform(0.5, 0.75)),
      'fence': _hsv_to_rgb(rng.uniform(0.05, 0.12), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.6)),
      'guardrail': np.array([175, 178, 182], np.float32) * rng.uniform(0.8, 1.1),
      'pole': np.array([120, 120, 125], np.float32) * rng.uniform(0.6, 1.3),
  }


def _building_colour(rng):
  kind = rng.integers(4)
  if kind == 0:  # brick
    return _hsv_to_rgb(rng.uniform(0.0, 0.06), rng.uniform(0.4, 0.7), rng.uniform(0.4, 0.7))
  if kind == 1:  # concrete
    return _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.1), rng.uniform(0.35, 0.75))
  if kind == 2:  # render
    return _hsv_to_rgb(rng.uniform(0.08, 0.16), rng.uniform(0.15, 0.4), rng.uniform(0.6, 0.9))
  return _hsv_to_rgb(rng.uniform(0.5, 0.65), rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.6))  # glass


# ------------------------------------------------------------------------------
# Ground: road, markings, sidewalks and terrain, row by row.


def _paint_sky(canvas, camera, palette, horizon_row):
  rows = np.arange(horizon_row, dtype=np.float32)[:, None]
  t = (rows / max(horizon_row, 1))[..., None]  # 0 at the top, 1 at the horizon
  gradient = palette['sky_top'] * (1 - t) + palette['sky_horizon'] * t
  canvas.colour[:horizon_row] = gradient
  canvas.label[:horizon_row] = SKY
  canvas.grain[:horizon_row] = 1.5


def _paint_ground(canvas, camera, layout, palette, advance, rng):
  height, width = canvas.label.shape
  first = int(np.ceil(camera.horizon + 0.5))
  rows = np.arange(first, height, dtype=np.float32)
  z = camera.focal * camera.elevation / (rows + 0.5 - camera.horizon)  # metres ahead
  z = z[:, None]
  x = (np.arange(width, dtype=np.float32)[None, :] + 0.5 - camera.centre_x) * z / camera.focal
  # Lateral offset from the road centre, which may curve away with distance.
  lateral = x - (layout['road_offset'] + layout['curvature'] * z**2)
  half = layout['road_half_width']
  label = np.full(lateral.shape, TERRAIN, np.uint8)
  colour = np.broadcast_to(palette['terrain'], lateral.shape + (3,)).copy()
  grain = np.full(lateral.shape, 10.0, np.float32)
  # Terrain is patchy: low-frequency blotches of bare ground and grass.
  blotch = np.sin(0.35 * (x + 3.0 * np.sin(0.2 * (z + advance)))) * np.cos(0.21 * (z + advance))
  colour *= (1 + 0.18 * blotch)[..., None]

  for side in (-1, 1):
    sidewalk = layout['sidewalk_width'][side]
    outer = side * lateral
    is_sidewalk = (outer >= half) & (outer < half + sidewalk)
    label[is_sidewalk] = SIDEWALK
    colour[is_sidewalk] = palette['sidewalk']
    grain[is_sidewalk] = 5.0
    # Paving joints every 1.5 m along the road.
    joints = is_sidewalk & (np.mod(z + advance, 1.5) < 0.08)
    colour[joints] *= 0.8
  on_road = np.abs(lateral) < half
  label[on_road] = ROAD
  colour[on_road] = palette['road']
  grain[on_road] = 6.0
  # Lane markings: 0.15 m wide, dashed in the centre, solid at the edges.
  line_half = 0.08
  dash = np.mod(z + advance, layout['dash_period']) < 0.5 * layout['dash_period']
  markings = (np.abs(lateral) < line_half) & dash
  for edge in layout['edge_lines']:
    markings |= np.abs(lateral - edge * (half - 0.35)) < line_half
  for lane in layout['lane_lines']:
    markings |= (np.abs(lateral - lane) < line_half) & dash
  markings &= on_road
  label[markings] = ROADLINE
  colour[markings] = palette['line'] * rng.uniform(0.8, 1.0)
  grain[markings] = 4.0
  # Darker far away: a touch of aerial perspective keeps depth cues honest.
  colour *= (1 - 0.15 * np.exp(-z / 40.0))[..., None]
  canvas.label[first:] = label
  canvas.colour[first:] = colour
  canvas.grain[first:] = grain


# ------------------------------------------------------------------------------
# Objects, drawn from far to near.


def _facade(canvas, camera, *, lateral, z_near, z_far, bottom_m, top_m, label, colour, grain,
            pattern=None, road_offset=0.0, curvature=0.0):
  """A vertical plane parallel to the road at `lateral` metres, between two depths."""
  def column(z):
    return camera.column(lateral + road_offset + curvature * z**2, z)

  left, right = sorted((column(z_near), column(z_far)))
  top = camera.horizon - camera.focal * (top_m - camera.elevation) / z_far
  top = min(top, camera.horizon - camera.focal * (top_m - camera.elevation) / z_near)
  bottom = camera.row_of_ground(z_near) - camera.focal * bottom_m / z_near
  box = _clip_box(top, bottom, left, right, canvas.label.shape)
  if box is None:
    return
  rows, cols = box
  xs = np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5
  # Depth of each column: invert column(z) by fixed-point iteration (curvature is small).
  z = np.full_like(xs, z_near)
  for _ in range(4):
    offset = lateral + road_offset + curvature * z**2
    z = np.where((xs - camera.centre_x) * offset > 0,
                 camera.focal * offset / np.where(xs == camera.centre_x, 1e-3, xs - camera.centre_x),
                 np.inf)
  inside = (z >= z_near) & (z <= z_far)
  z = np.where(inside, z, z_near)  # columns off the facade would have infinite depth
  ys = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5
  height_m = camera.elevation - (ys - camera.horizon) * z[None, :] / camera.focal
  where = inside[None, :] & (height_m >= bottom_m) & (height_m <= top_m)
  if not where.any():
    return
  fill = np.broadcast_to(colour, where.shape + (3,)).astype(np.float32)
  if pattern is not None:
    fill = fill * pattern(np.broadcast_to(z[None, :], where.shape), height_m)[..., None]
  canvas.paint(rows, cols, where, label, fill, grain)


def _windows(rng):
  spacing_u, spacing_v = rng.uniform(2.5, 4.5), rng.uniform(2.8, 3.6)
  dark = rng.uniform(0.3, 0.6)

  def pattern(u, v):
    window = (np.mod(u, spacing_u) < 0.55 * spacing_u) & (np.mod(v, spacing_v) > 0.35 * spacing_v)
    window &= v > 2.5
    return np.where(window, dark, 1.0)
  return pattern


def _bars(spacing):
  def pattern(u, v):
    bar = np.mod(u, spacing) < 0.3 * spacing
    rail = np.mod(v, 0.7) < 0.12
    return np.where(bar | rail, 1.0, 0.45)
  return pattern


def _billboard(canvas, camera, *, x, z, width_m, bottom_m, top_m, label, colour, grain,
               shape='box', pattern=None):
  """An upright shape facing the camera at lateral x, depth z."""
  scale = camera.focal / z
  centre = camera.column(x, z)
  ground = camera.row_of_ground(z)
  top, bottom = ground - top_m * scale, ground - bottom_m * scale
  left, right = centre - 0.5 * width_m * scale, centre + 0.5 * width_m * scale
  box = _clip_box(top, bottom, left, right, canvas.label.shape)
  if box is None or right - left < 0.5:
    return
  rows, cols = box
  ys = (np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5 - top) / max(bottom - top, 1e-3)
  xs = (np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5 - left) / max(right - left, 1e-3)
  if shape == 'ellipse':
    where = (xs - 0.5)**2 + (ys - 0.5)**2 <= 0.25
  else:
    where = (xs >= 0) & (xs <= 1) & (ys >= 0) & (ys <= 1)
  if not where.any():
    return
  fill = np.broadcast_to(colour, where.shape + (3,)).astype(np.float32)
  if pattern is not None:
    fill = fill * pattern(np.broadcast_to(xs, where.shape), np.broadcast_to(ys, where.shape))[..., None]
  canvas.paint(rows, cols, where, label, fill, grain)


def _vehicle_pattern(u, v):
  """Rear view: dark rear window, tail lights, dark bumper band."""
  shade = np.ones_like(u)
  shade = np.where((v < 0.45) & (v > 0.08) & (u > 0.12) & (u < 0.88), 0.35, shade)
  shade = np.where((v > 0.55) & (v < 0.68) & ((u < 0.14) | (u > 0.86)), 1.6, shade)
  shade = np.where(v > 0.85, 0.3, shade)
  return shade


def _pedestrian_pattern(u, v):
  """Darker legs, skin-toned head band."""
  return np.where(v > 0.55, 0.55, np.where(v < 0.15, 1.4, 1.0))


def _tree(canvas, camera, rng, palette, x, z):
  trunk_h = rng.uniform(1.5, 3.5)
  crown = rng.uniform(2.0, 5.0)
  _billboard(canvas, camera, x=x, z=z, width_m=0.35, bottom_m=0, top_m=trunk_h + 0.5,
             label=VEGETATION, colour=_jitter(rng, np.array([80, 60, 45], np.float32)), grain=12)
  _billboard(canvas, camera, x=x, z=z, width_m=crown * rng.uniform(0.8, 1.3), bottom_m=trunk_h,
             top_m=trunk_h + crown, label=VEGETATION, colour=_jitter(rng, palette['vegetation'], 15),
             grain=30, shape='ellipse')


def _objects(camera, layout, palette, rng):
  """Returns (depth, draw) pairs; drawing far to near gives correct occlusion."""
  items = []
  half = layout['road_half_width']
  offset, curvature = layout['road_offset'], layout['curvature']
  advance = layout['advance']

  def at(z):  # world x of the road centre at depth z
    return offset + curvature * z**2

  for side in (-1, 1):
    edge = half + layout['sidewalk_width'][side]
    # Facades: buildings, or walls, fences and hedges where there are none.
    z = rng.uniform(4, 12) - advance
    while z < 160:
      length = rng.uniform(8, 40)
      kind = rng.choice(['building', 'building', 'gap', 'wall', 'fence', 'hedge'],
                        p=layout['facade_mix'])
      setback = edge + rng.uniform(0.0, 6.0)
      near, far = max(z, 1.0), z + length
      if far > 1.0 and kind != 'gap':
        kw = dict(lateral=side * setback, z_near=near, z_far=far, road_offset=offset,
                  curvature=curvature, bottom_m=0.0)
        if kind == 'building':
          kw.update(top_m=rng.uniform(5, 22), label=BUILDING, colour=_building_colour(rng),
                    grain=6, pattern=_windows(rng))
        elif kind == 'wall':
          kw.update(top_m=rng.uniform(1.0, 3.0), label=WALL, colour=_jitter(rng, palette['wall']),
                    grain=8)
        elif kind == 'fence':
          kw.update(top_m=rng.uniform(1.2, 2.0), label=FENCE, colour=_jitter(rng, palette['fence']),
                    grain=8, pattern=_bars(rng.uniform(0.15, 0.4)))
        else:
          kw.update(top_m=rng.uniform(1.0, 2.5), label=VEGETATION,
                    colour=_jitter(rng, palette['vegetation']), grain=30)
        items.append((far, lambda c, kw=kw: _facade(c, camera, **kw)))
      z = far + rng.uniform(0, 6)
    # Trees between the facades and the road.
    for z in np.sort(rng.uniform(3, 120, rng.poisson(layout['trees']))) - advance:
      if z > 1.5:
        x = at(z) + side * (edge + rng.uniform(-0.5, 3.0))
        items.append((z, lambda c, x=x, z=z, r=np.random.default_rng(rng.integers(2**31)):
                      _tree(c, camera, r, palette, x, z)))
    # Poles, some carrying a sign or a traffic light.
    for z in rng.uniform(4, 90, rng.poisson(layout['poles'])) - advance:
      if z <= 1.5:
        continue
      x = at(z) + side * (half + rng.uniform(0.3, 0.8))
      pole_h = rng.uniform(3.5, 8.0)
      kind = rng.choice(['plain', 'sign', 'light'], p=[0.6, 0.25, 0.15])

      def draw(c, x=x, z=z, pole_h=pole_h, kind=kind, r=np.random.default_rng(rng.integers(2**31))):
        _billboard(c, camera, x=x, z=z, width_m=0.18, bottom_m=0, top_m=pole_h, label=POLE,
                   colour=palette['pole'], grain=4)
        if kind == 'sign':
          colour = [np.array([200, 30, 30]), np.array([30, 70, 190]), np.array([230, 200, 40])][r.integers(3)]
          _billboard(c, camera, x=x, z=z - 0.05, width_m=0.7, bottom_m=pole_h - 0.9, top_m=pole_h - 0.2,
                     label=TRAFFIC_SIGN, colour=_jitter(r, colour.astype(np.float32)), grain=3,
                     shape='ellipse' if r.random() < 0.5 else 'box')
        elif kind == 'light':
          lamp = [np.array([230, 40, 30]), np.array([240, 180, 30]), np.array([40, 220, 90])][r.integers(3)]
          _billboard(c, camera, x=x, z=z - 0.05, width_m=0.4, bottom_m=pole_h - 1.1, top_m=pole_h,
                     label=TRAFFIC_LIGHT, colour=np.array([35, 35, 38], np.float32), grain=3,
                     pattern=lambda u, v, lamp_row=r.integers(3): np.where(
                         (np.abs(v - (lamp_row + 0.5) / 3) < 0.12) & (np.abs(u - 0.5) < 0.3), 5.0, 1.0))
      items.append((z, draw))
    # Pedestrians on the sidewalk: rare, like in CARLA.
    for z in rng.uniform(4, 60, rng.poisson(layout['pedestrians'])) - advance:
      if z > 1.5:
        x = at(z) + side * (half + rng.uniform(0.3, layout['sidewalk_width'][side] + 0.3))
        colour = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
        items.append((z, lambda c, x=x, z=z, colour=colour: _billboard(
            c, camera, x=x, z=z, width_m=0.55, bottom_m=0, top_m=1.75, label=PEDESTRIAN,
            colour=colour, grain=6, shape='ellipse', pattern=_pedestrian_pattern)))
  # Vehicles in lanes; a guardrail along one edge on some roads.
  for z in rng.uniform(5, 80, rng.poisson(layout['vehicles'])) - 0.5 * advance:
    if z > 2.5:
      lane = rng.choice(layout['lanes'])
      width = rng.uniform(1.7, 2.1)
      colour = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.9), rng.uniform(0.15, 0.95))
      items.append((z, lambda c, x=at(z) + lane, z=z, width=width, colour=colour, h=rng.uniform(1.3, 1.9):
                    _billboard(c, camera, x=x, z=z, width_m=width, bottom_m=0.0, top_m=h,
                               label=VEHICLES, colour=colour, grain=5, pattern=_vehicle_pattern)))
  if layout['guardrail']:
    side = layout['guardrail']
    kw = dict(lateral=side * (half + 0.2), z_near=1.0, z_far=150.0, bottom_m=0.3, top_m=0.8,
              label=GUARDRAIL, colour=palette['guardrail'], grain=3, road_offset=offset,
              curvature=curvature)
    items.append((0.5, lambda c, kw=kw: _facade(c, camera, **kw)))
  return items


def _layout(rng, width_px, height_px):
  """Everything shared by the frames of one recording."""
  lanes_per_side = rng.choice([1, 1, 2])
  lane = rng.uniform(3.0, 3.8)
  half = lanes_per_side * lane
  return {
      'horizon_fraction': rng.uniform(0.40, 0.52),
      'centre_shift': rng.uniform(-0.05, 0.05),
      'focal_fraction': rng.uniform(0.55, 0.8),
      'elevation': rng.uniform(1.3, 2.0),
      'road_half_width': half,
      # The camera drives in some lane: the road centre is off to one side.
      'road_offset': rng.uniform(-0.6, 0.6) * half,
      'curvature': rng.normal(0, 0.0012),
      'dash_period': rng.uniform(6, 12),
      'edge_lines': [s for s in (-1, 1) if rng.random() < 0.6],
      'lane_lines': [s * lane for s in (-1, 1)] if lanes_per_side == 2 else [],
      'lanes': ([-1.5 * lane, -0.5 * lane, 0.5 * lane, 1.5 * lane] if lanes_per_side == 2
                else [-0.5 * lane, 0.5 * lane]),
      'sidewalk_width': {s: (rng.uniform(1.0, 3.0) if rng.random() < 0.6 else 0.0) for s in (-1, 1)},
      'facade_mix': rng.dirichlet([3, 3, 4, 3, 1, 2]),
      'trees': rng.uniform(2, 14),
      'poles': rng.uniform(1, 5),
      'pedestrians': rng.uniform(0, 0.6),
      'vehicles': rng.uniform(0, 2.0),
      'guardrail': int(rng.choice([0, 0, -1, 1])),
  }


def render_scene(block_rng_seed: Sequence[int], frame: int,
                 size: tuple[int, int] = (480, 640)) -> tuple[np.ndarray, np.ndarray]:
  """One frame: uint8 image [H, W, 3] and uint8 class indices [H, W]."""
  height, width = size
  layout = _layout(np.random.default_rng(block_rng_seed), width, height)
  layout['advance'] = frame * FRAME_ADVANCE_M
  scene_rng = np.random.default_rng(list(block_rng_seed) + [0])  # colours: fixed per recording
  frame_rng = np.random.default_rng(list(block_rng_seed) + [1, frame])
  palette = _palette(scene_rng)
  camera = _Camera(height, width, horizon=layout['horizon_fraction'] * height,
                   centre_x=(0.5 + layout['centre_shift']) * width,
                   focal=layout['focal_fraction'] * width, elevation=layout['elevation'])
  canvas = _Canvas(np.zeros((height, width, 3), np.float32), np.zeros((height, width), np.uint8),
                   np.zeros((height, width), np.float32))
  horizon_row = int(np.ceil(camera.horizon + 0.5))
  _paint_sky(canvas, camera, palette, horizon_row)
  _paint_ground(canvas, camera, layout, palette, layout['advance'], scene_rng)
  # A distant tree line or skyline hides the bare horizon.
  objects = _objects(camera, layout, palette, np.random.default_rng(list(block_rng_seed) + [2]))
  for _, draw in sorted(objects, key=lambda item: -item[0]):
    draw(canvas)
  # Lighting, colour cast, texture and sensor noise.
  gain = frame_rng.uniform(0.65, 1.25) * scene_rng.uniform(0.9, 1.1)
  cast = scene_rng.uniform(0.9, 1.1, 3).astype(np.float32)
  fine = frame_rng.standard_normal((height, width), dtype=np.float32)
  coarse = frame_rng.standard_normal((height // 24 + 2, width // 24 + 2), dtype=np.float32)
  coarse = np.asarray(Image.fromarray(coarse, mode='F').resize((width, height), Image.BILINEAR))
  image = canvas.colour * (1 + 0.06 * coarse)[..., None] + (canvas.grain * fine)[..., None]
  image = image * (gain * cast)
  image += frame_rng.normal(0, frame_rng.uniform(1, 6), (height, width, 1)).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8), canvas.label


def scene_name(index: int) -> str:
  """Six digits like CARLA's: recording block (3 digits) then frame (3 digits)."""
  block, frame = divmod(index, FRAMES_PER_RECORDING)
  return f'{block:03d}{frame:03d}'


def _write_one(output_dir: pathlib.Path, index: int, seed: int, size: tuple[int, int]) -> None:
  block, frame = divmod(index, FRAMES_PER_RECORDING)
  image, mask = render_scene((seed, block), frame, size)
  name = scene_name(index)
  carla_files.write_image(output_dir / carla_files.IMAGE_DIR / f'{name}.png', image)
  carla_files.write_mask(output_dir / carla_files.MASK_DIR / f'{name}.png', mask)


def write_scenes(output_dir: carla_files.PathLike, num_scenes: int, seed: int = 0,
                 size: tuple[int, int] = (480, 640)) -> list[str]:
  """Writes `num_scenes` pairs in the CARLA format; returns their names."""
  output_dir = pathlib.Path(output_dir)
  if num_scenes < 1:
    raise errors.UserError(f'the number of scenes must be >= 1, got {num_scenes}')
  if min(size) < carla_files.MIN_SIDE:
    raise errors.UserError(f'scenes of {size[1]}x{size[0]} pixels are too small: height and '
                           f'width must be >= {carla_files.MIN_SIDE}')
  try:
    for sub in (carla_files.IMAGE_DIR, carla_files.MASK_DIR):
      (output_dir / sub).mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise errors.UserError(f'{output_dir}: cannot write scenes there ({error.strerror or error})'
                           ) from error
  # numpy and zlib release the GIL for most of the work.
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    list(pool.map(lambda i: _write_one(output_dir, i, seed, tuple(size)), range(num_scenes)))
  return [scene_name(i) for i in range(num_scenes)]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  names = write_scenes(f.output, f.num_scenes, f.seed, (f.height, f.width))
  print(f'wrote {len(names)} scenes to {f.output}')


def define_flags() -> None:
  """The command's flags, defined only when it runs: the library is imported by
  programs with flags of their own."""
  flags.DEFINE_string('output', None, 'Folder to write CameraRGB/ and CameraMask/ into.')
  flags.DEFINE_integer('num_scenes', 500, 'Number of scenes.')
  flags.DEFINE_integer('seed', 0, 'Random seed; the same seed writes the same files.')
  flags.DEFINE_integer('height', 480, 'Image height in pixels.')
  flags.DEFINE_integer('width', 640, 'Image width in pixels.')
  flags.mark_flag_as_required('output')


def run() -> None:
  """The console script `unet-jax-synthetic`."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
