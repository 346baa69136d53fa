# Set-up is a virtual environment in .venv (Python >= 3.12, found by
# scripts/find_python.sh; `make PYTHON=/path/to/python3.12` chooses one) with the
# versions in constraints.txt. Every target installs what it needs first; a
# second run reuses the environment.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Test workers (pytest-xdist); multi-device tests force 8 host devices themselves.
WORKERS ?= 2

.PHONY: setup test demo peer benchmark clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	@if ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
	  python=$$(PYTHON='$(PYTHON)' sh scripts/find_python.sh) || exit 1; \
	  echo "Creating $(VENV) with $$python"; rm -rf $(VENV); "$$python" -m venv $(VENV); fi
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,export,pretrained]'
	touch $@

test: $(INSTALLED)
	$(PY) -m pytest -n $(WORKERS) -q tests

# Train on synthetic scenes, evaluate on the validation split and on frames the
# model never saw (a new seed), and predict those frames' images.
demo: $(INSTALLED)
	$(PY) -m unet_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
	$(PY) -m unet_jax.evaluate --workdir=runs/synthetic --split=validation
	$(PY) -m unet_jax.synthetic --output=runs/synthetic/unseen_frames --num_scenes=4 --seed=1
	$(PY) -m unet_jax.evaluate --workdir=runs/synthetic --data_dir=runs/synthetic/unseen_frames
	$(PY) -m unet_jax.predict --workdir=runs/synthetic --input=runs/synthetic/unseen_frames/CameraRGB \
		--output=runs/synthetic/predictions
	$(PY) -m unet_jax.export --workdir=runs/synthetic --format=stablehlo --output=runs/synthetic/export

# PyTorch for the peer benchmark: the CPU build (about 200 MB) from PyTorch's own
# index where it can be reached; otherwise PyPI's, which for Python 3.12 on
# Linux x86_64 is the CUDA build (about 5 GB with its NVIDIA packages).
peer: $(INSTALLED)
	$(PY) -m pip install --quiet -c constraints.txt --index-url https://download.pytorch.org/whl/cpu \
	  'torch==2.13.0' || $(PY) -m pip install --quiet -c constraints.txt 'torch==2.13.0'

# Train-step speed against the same U-Net in PyTorch, in one process (README: Speed).
benchmark: peer
	$(PY) -m benchmarks.train_speed --config=configs/carla.py --config.batch_size=32 \
		--config.model.use_batch_norm=False --peer=torch --json=benchmark.json

clean:
	rm -rf $(VENV) runs data/synthetic data/synthetic_smoke
