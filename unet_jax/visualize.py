"""Pictures of segmentations: colour masks, overlays, example grids, confusion heat maps.

Masks are uint8/int class indices [H, W]; images are uint8 RGB [H, W, 3].
Colours come from the CARLA palette (`unet_jax.classes.PALETTE`). Figures
are matplotlib `Figure` objects drawn by the Agg canvas directly, not through
pyplot: no display, no global figure state, nothing to close.
"""

from collections.abc import Sequence
import os

from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from unet_jax import classes

# Colour of pixels whose prediction disagrees with the truth, and of pixels
# that are not scored (outside the labelled region).
WRONG_COLOUR = np.array((255, 0, 0), np.uint8)
RIGHT_COLOUR = np.array((40, 40, 40), np.uint8)
UNSCORED_COLOUR = np.array((255, 255, 255), np.uint8)


def colorize(mask: np.ndarray, palette: np.ndarray = classes.PALETTE) -> np.ndarray:
  """Class indices [H, W] -> uint8 RGB [H, W, 3] in the palette's colours."""
  mask = np.asarray(mask)
  if mask.size and (mask.min() < 0 or mask.max() >= len(palette)):
    raise ValueError(f'mask values must be class indices 0..{len(palette) - 1}, '
                     f'found {mask.min()}..{mask.max()}')
  return np.asarray(palette, np.uint8)[mask.astype(np.intp)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5,
            palette: np.ndarray = classes.PALETTE) -> np.ndarray:
  """The image with the colour mask blended over it; uint8 [H, W, 3]."""
  image = np.asarray(image)
  if image.shape[:2] != np.shape(mask):
    raise ValueError(f'image {image.shape[:2]} and mask {np.shape(mask)} differ in size')
  blend = (1 - alpha) * image[..., :3].astype(np.float32) + alpha * colorize(mask, palette)
  return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def disagreement(truth: np.ndarray, prediction: np.ndarray,
                 scored: np.ndarray | None = None) -> np.ndarray:
  """uint8 RGB [H, W, 3]: red where the prediction is wrong, dark where right.

  Pixels outside `scored` (e.g. the ignore label) are white: no verdict.
  """
  truth, prediction = np.asarray(truth), np.asarray(prediction)
  picture = np.where((truth != prediction)[..., None], WRONG_COLOUR, RIGHT_COLOUR)
  if scored is not None:
    picture = np.where(np.asarray(scored)[..., None], picture, UNSCORED_COLOUR)
  return picture.astype(np.uint8)


def _name(index: int, class_names: Sequence[str]) -> str:
  return class_names[index] if index < len(class_names) else f'class{index}'


def _legend_handles(class_indices: Sequence[int], class_names: Sequence[str], palette):
  return [patches.Patch(facecolor=np.asarray(palette[i]) / 255.0, edgecolor='black',
                        linewidth=0.5, label=_name(i, class_names))
          for i in class_indices]


def examples_figure(path: str | os.PathLike, images: Sequence[np.ndarray],
                    truths: Sequence[np.ndarray], predictions: Sequence[np.ndarray], *,
                    titles: Sequence[str] | None = None,
                    scored: Sequence[np.ndarray] | None = None,
                    class_names: Sequence[str] = classes.CLASS_NAMES,
                    palette: np.ndarray = classes.PALETTE) -> None:
  """Writes a PNG grid: one row per frame, columns image | truth | prediction | errors.

  The legend lists the classes that occur in any truth or prediction shown.
  """
  if not len(images) == len(truths) == len(predictions) or not len(images):
    raise ValueError(f'need the same non-zero number of images ({len(images)}), truths '
                     f'({len(truths)}) and predictions ({len(predictions)})')
  rows = len(images)
  height, width = np.shape(truths[0])
  panel_width = 2.6
  panel_height = max(panel_width * height / width, 1.2)
  figure = Figure(figsize=(4 * panel_width + 1.8, rows * panel_height + 0.5))
  axes = figure.subplots(rows, 4, squeeze=False)
  column_titles = ('image', 'ground truth', 'prediction', 'errors (red)')
  for row in range(rows):
    wrong = np.asarray(truths[row]) != np.asarray(predictions[row])
    if scored is not None:
      wrong &= np.asarray(scored[row])
      error_rate = wrong.sum() / max(int(np.asarray(scored[row]).sum()), 1)
    else:
      error_rate = wrong.mean()
    panels = (images[row], colorize(truths[row], palette), colorize(predictions[row], palette),
              disagreement(truths[row], predictions[row],
                           None if scored is None else scored[row]))
    for column, panel in enumerate(panels):
      axis = axes[row, column]
      axis.imshow(panel, interpolation='nearest')
      axis.set_xticks([])
      axis.set_yticks([])
      if row == 0:
        axis.set_title(column_titles[column], fontsize=9)
    label = titles[row] if titles is not None else f'frame {row}'
    axes[row, 0].set_ylabel(label, fontsize=8)
    axes[row, 3].set_xlabel(f'{100 * error_rate:.1f}% wrong', fontsize=8)
  present = np.unique(np.concatenate([np.ravel(m) for m in [*truths, *predictions]]))
  figure.legend(handles=_legend_handles(present.tolist(), class_names, palette),
                loc='center right', fontsize=8, frameon=False, title='classes',
                title_fontsize=9)
  figure.tight_layout(rect=(0, 0, 1 - 1.6 / (4 * panel_width + 1.8), 1))
  _save(figure, path)


def row_normalize(confusion: np.ndarray) -> np.ndarray:
  """Each row divided by its sum (the share of a true class given to each prediction).

  Rows of classes absent from the truth stay zero.
  """
  confusion = np.asarray(confusion, np.float64)
  totals = confusion.sum(axis=1, keepdims=True)
  return np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)


def confusion_figure(path: str | os.PathLike, confusion: np.ndarray, *,
                     class_names: Sequence[str] = classes.CLASS_NAMES,
                     title: str = 'confusion matrix: % of each true class') -> None:
  """Writes a row-normalised confusion-matrix heat map as PNG.

  Only classes that occur in the truth or the prediction get a row and a
  column: the CARLA tag set has 23 classes and a split rarely holds them all,
  and empty rows would only crowd the picture.
  """
  confusion = np.asarray(confusion)
  shown = np.flatnonzero((confusion.sum(axis=0) + confusion.sum(axis=1)) > 0)
  if not shown.size:
    shown = np.arange(len(confusion))
  normalized = row_normalize(confusion)[np.ix_(shown, shown)]
  names = [_name(i, class_names) for i in shown]
  size = 1.8 + 0.42 * len(shown)
  figure = Figure(figsize=(size + 1.2, size))
  axis = figure.subplots()
  picture = axis.imshow(normalized, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
  axis.set_xticks(range(len(shown)), names, rotation=60, ha='right', fontsize=8)
  axis.set_yticks(range(len(shown)), names, fontsize=8)
  axis.set_xlabel('predicted class')
  axis.set_ylabel('true class')
  axis.set_title(title, fontsize=10)
  for row in range(len(shown)):
    for column in range(len(shown)):
      value = normalized[row, column]
      if value >= 0.005:
        axis.text(column, row, f'{100 * value:.0f}', ha='center', va='center', fontsize=6,
                  color='white' if value > 0.5 else 'black')
  figure.colorbar(picture, ax=axis, fraction=0.046, pad=0.04, label='share of the true class')
  figure.tight_layout()
  _save(figure, path)


def _save(figure: Figure, path: str | os.PathLike) -> None:
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=80, format='png')
