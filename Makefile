# MushroomCLIP. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip spec installed before requirements.txt, e.g. TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
TORCH_SPEC ?=
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
DEMO ?= demo
BENCH ?= /tmp/mushroomclip-bench
NPROC ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: help setup test demo demo-data app train benchmark bench-prepare bench-zero-shot bench-train lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv with requirements.txt and the package (editable)

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet $(TORCH_SPEC))
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --editable .
	touch $@

test: setup  ## run the test suite (offline, CPU, tiny data)
	$(OFFLINE) $(PY) -m pytest -q

demo-data: setup  ## (re)make the synthetic demo download and prepare it into $(DEMO)/prepared
	$(OFFLINE) $(PY) data_scripts/make_synthetic.py --output $(DEMO)/kaggle --classes 8 --per-class 40 --corrupt 2 --dirty
	$(OFFLINE) $(PY) data_scripts/prepare_kaggle.py --source $(DEMO)/kaggle --output $(DEMO)/prepared --no-progress

demo: demo-data  ## offline tour: data -> baselines -> LoRA training -> predict -> benchmark table with the adapter (< 5 min)
	$(OFFLINE) $(PY) -m mushroomclip.baselines --data $(DEMO)/prepared --split test --output $(DEMO)/results/baselines
	$(OFFLINE) $(PY) train.py --config configs/tiny.yaml data.path=$(DEMO)/prepared training.output_dir=$(DEMO)/runs/tiny --overwrite
	@$(PY) -c "import glob, shutil; f = sorted(glob.glob('$(DEMO)/prepared/test/*/*.jpg')); \
	[shutil.copy(p, '$(DEMO)/sample%d.jpg' % i) for i, p in enumerate([f[0], f[len(f) // 2]])]"
	$(OFFLINE) $(PY) predict.py $(DEMO)/sample0.jpg $(DEMO)/sample1.jpg --adapter $(DEMO)/runs/tiny --top-k 3
	$(OFFLINE) $(PY) evaluate_zero_shot.py --config configs/benchmark_offline.yaml --data $(DEMO)/prepared \
	  --include-adapters $(DEMO)/runs --output $(DEMO)/results/benchmark > $(DEMO)/results/benchmark.log 2>&1
	$(PY) -m mushroomclip.benchmark report --results $(DEMO)/results/benchmark

APP_MODEL ?= $(DEMO)/runs/tiny
app: setup  ## serve the web app on http://127.0.0.1:7860, offline, with the adapter of make demo (APP_MODEL=runs/NAME)
	@test -f $(APP_MODEL)/adapter_config.json || \
	  { echo "error: no adapter in $(APP_MODEL): run make demo first, or make app APP_MODEL=runs/NAME" >&2; exit 2; }
	$(OFFLINE) $(PY) app.py --model $(APP_MODEL)

CONFIG ?= configs/lora_b32.yaml
train: setup  ## LoRA fine-tuning with accelerate_config.yaml (bf16, one GPU): CONFIG=configs/X.yaml ARGS="key=value ..."
	$(VENV)/bin/accelerate launch -q --config_file accelerate_config.yaml train.py --config $(CONFIG) $(ARGS)

benchmark: setup  ## zero-/few-shot for every configured model -> results/benchmark.md (tiny models on demo data when offline)
	@if $(PY) -m mushroomclip.benchmark hub-reachable; then \
	  $(PY) evaluate_zero_shot.py --config configs/benchmark.yaml; \
	else \
	  grep -qs "\"complete\": true" $(DEMO)/prepared/prepare_report.json || $(MAKE) --no-print-directory demo-data; \
	  $(OFFLINE) $(PY) evaluate_zero_shot.py --config configs/benchmark_offline.yaml; \
	fi
	$(PY) -m mushroomclip.benchmark report --results results

bench-prepare: setup  ## prepare ~20k synthetic 500px images (169 classes): copy path, then re-encode path; prints images/s
	$(PY) data_scripts/make_synthetic.py --output $(BENCH)/kaggle --classes 169 --per-class 120 --size 500 --num-proc $(NPROC)
	@for side in 512 256; do \
	  rm -rf $(BENCH)/prepared-$$side; \
	  $(PY) data_scripts/prepare_kaggle.py --source $(BENCH)/kaggle --output $(BENCH)/prepared-$$side --max-side $$side \
	    --num-proc $(NPROC) --no-progress > $(BENCH)/prepare-$$side.log || exit 1; \
	  $(PY) -c "import json; r = json.load(open('$(BENCH)/prepared-$$side/prepare_report.json')); n = $(NPROC); \
	print(f\"bench-prepare --max-side $$side: {r['unique_images']} images ({r['reencoded']} re-encoded) in {r['seconds']} s \
	= {r['images_per_second']:.0f} images/s on {n} cores ({r['images_per_second'] / n:.0f} per core)\")"; \
	done

# 169 species x ~130 images of 500 px (~15k train): enough batches of 256 for a steady-state measurement
# with every loader worker busy. Made once, reused by both speed benchmarks.
SPEED_DATA := $(BENCH)/speed-prepared
$(SPEED_DATA)/prepare_report.json:
	$(PY) data_scripts/make_synthetic.py --output $(BENCH)/speed-kaggle --classes 169 --per-class 130 --size 500 --num-proc $(NPROC)
	$(PY) data_scripts/prepare_kaggle.py --source $(BENCH)/speed-kaggle --output $(SPEED_DATA) --num-proc $(NPROC) --no-progress > /dev/null

bench-zero-shot: setup $(SPEED_DATA)/prepare_report.json  ## zero-shot image-encoding images/s of the clip-b32 architecture (random weights), batch 256: data pipeline vs model only
	$(OFFLINE) $(PY) -m mushroomclip.benchmark speed --data $(SPEED_DATA) --model clip-b32 --batch-size 256 --num-workers $(NPROC)

TOWERS ?= vision,text
bench-train: setup $(SPEED_DATA)/prepare_report.json  ## LoRA training images/s of the clip-b32 architecture (random weights): data pipeline vs model only (TOWERS=vision: frozen text)
	$(OFFLINE) $(PY) -m mushroomclip.benchmark train-speed --data $(SPEED_DATA) --model clip-b32 --num-workers $(NPROC) --towers $(TOWERS)

lint: setup  ## ruff lint + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:  ## remove demo outputs and caches (keeps .venv)
	rm -rf $(DEMO) results .pytest_cache .ruff_cache
