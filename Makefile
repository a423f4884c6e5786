# MushroomCLIP. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Which torch `make setup` installs before requirements.txt. TORCH=cpu: the CPU-only wheels from PyTorch's
# index (no 5 GB of CUDA libraries on a machine without a GPU; cu126, cu128, ... name a CUDA build the same way).
# TORCH_SPEC pins versions, e.g. TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" (CI). Neither: pip's default build.
TORCH ?=
TORCH_SPEC ?=
TORCH_INDEX := $(if $(TORCH),--index-url https://download.pytorch.org/whl/$(TORCH))
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
DEMO ?= demo
BENCH ?= /tmp/mushroomclip-bench
NPROC ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: help setup test demo demo-data app train benchmark bench-prepare bench-zero-shot bench-train bench-gpu bench-hierarchy bench-table lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv (package + test extras); TORCH=cpu: CPU-only torch wheels, TORCH_SPEC="torch==X ...": pinned

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH)$(TORCH_SPEC),,@command -v nvidia-smi >/dev/null 2>&1 || echo "note: no NVIDIA GPU found, yet pip's \
	default torch (several GB of CUDA libraries) comes next; for the CPU wheels: rm -rf $(VENV) && make setup TORCH=cpu" >&2)
	$(if $(TORCH)$(TORCH_SPEC),$(PY) -m pip install --quiet $(TORCH_INDEX) $(or $(TORCH_SPEC),torch torchvision))
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: setup  ## run the test suite (offline, CPU, tiny data)
	$(OFFLINE) $(PY) -m pytest -q

demo-data: setup  ## (re)make the synthetic demo download and prepare it into $(DEMO)/prepared
	$(OFFLINE) $(PY) data_scripts/make_synthetic.py --output $(DEMO)/kaggle --classes 8 --per-class 40 --corrupt 2 --dirty
	$(OFFLINE) $(PY) data_scripts/prepare_kaggle.py --source $(DEMO)/kaggle --output $(DEMO)/prepared --no-progress

demo: demo-data  ## offline tour: data -> baselines -> LoRA training -> predict -> benchmark table with the adapter (< 5 min)
	$(OFFLINE) $(PY) -m mushroomclip.evaluation.baselines --data $(DEMO)/prepared --split test --output $(DEMO)/results/baselines
	$(OFFLINE) $(PY) train.py --config configs/tiny.yaml data.path=$(DEMO)/prepared training.output_dir=$(DEMO)/runs/tiny --overwrite
	@$(PY) -c "import glob, shutil; f = sorted(glob.glob('$(DEMO)/prepared/test/*/*.jpg')); \
	[shutil.copy(p, '$(DEMO)/sample%d.jpg' % i) for i, p in enumerate([f[0], f[len(f) // 2]])]"
	$(OFFLINE) $(PY) predict.py $(DEMO)/sample0.jpg $(DEMO)/sample1.jpg --adapter $(DEMO)/runs/tiny --top-k 3
	$(OFFLINE) $(PY) evaluate_zero_shot.py --config configs/benchmark_offline.yaml --data $(DEMO)/prepared \
	  --include-adapters $(DEMO)/runs --output $(DEMO)/results/benchmark > $(DEMO)/results/benchmark.log 2>&1
	$(PY) -m mushroomclip.evaluation.benchmark report --results $(DEMO)/results/benchmark

APP_MODEL ?= $(DEMO)/runs/tiny
app: setup  ## serve the web app on http://127.0.0.1:7860, offline, with the adapter of make demo (APP_MODEL=runs/NAME)
	@test -f $(APP_MODEL)/adapter_config.json || \
	  { echo "error: no adapter in $(APP_MODEL): run make demo first, or make app APP_MODEL=runs/NAME" >&2; exit 2; }
	$(OFFLINE) $(PY) app.py --model $(APP_MODEL)

CONFIG ?= configs/lora_b32.yaml
train: setup  ## LoRA fine-tuning with accelerate_config.yaml (bf16, one GPU): CONFIG=configs/X.yaml ARGS="key=value ..."
	$(VENV)/bin/accelerate launch -q --config_file accelerate_config.yaml train.py --config $(CONFIG) $(ARGS)

benchmark: setup  ## zero-/few-shot for every configured model, + the runs (LoRA, supervised) of runs/ (offline: tiny models on demo data, runs/ or demo/runs) -> results/benchmark.md
	@if $(PY) -m mushroomclip.evaluation.benchmark hub-reachable; then \
	  $(PY) evaluate_zero_shot.py --config configs/benchmark.yaml $(if $(wildcard runs/.),--include-adapters runs); \
	else \
	  grep -qs "\"complete\": true" $(DEMO)/prepared/prepare_report.json || $(MAKE) --no-print-directory demo-data; \
	  $(OFFLINE) $(PY) evaluate_zero_shot.py --config configs/benchmark_offline.yaml \
	    $(if $(wildcard runs/.),--include-adapters runs,$(if $(wildcard $(DEMO)/runs/.),--include-adapters $(DEMO)/runs)); \
	fi
	$(if $(wildcard runs/.),$(PY) -m mushroomclip.evaluation.benchmark novel --runs runs --results results,$(if $(wildcard $(DEMO)/runs/.),$(OFFLINE) $(PY) -m mushroomclip.evaluation.benchmark novel --runs $(DEMO)/runs --results results --num-workers 0))
	$(PY) -m mushroomclip.evaluation.benchmark report --results results

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

# The speed benchmarks' data: SPEED_CLASSES species x SPEED_PER_CLASS images of SPEED_SIZE px, made once
# and reused by both. The default (169 x 130, ~15k train images) is for a GPU: enough batches of 256 for a
# steady-state measurement with every loader worker busy. For a small CPU run, e.g.:
#   make bench-train bench-zero-shot SPEED_CLASSES=8 SPEED_PER_CLASS=40 WORKERS=1 STEPS=2 ZS_BATCH=32
SPEED_CLASSES ?= 169
SPEED_PER_CLASS ?= 130
SPEED_SIZE ?= 500
SPEED_SHORT_SIDE ?= 0
SPEED_SOURCE := $(BENCH)/speed-$(SPEED_CLASSES)x$(SPEED_PER_CLASS)-$(SPEED_SIZE)px-kaggle
SPEED_DATA := $(BENCH)/speed-$(SPEED_CLASSES)x$(SPEED_PER_CLASS)-$(SPEED_SIZE)px$(if $(filter-out 0,$(SPEED_SHORT_SIDE)),-short$(SPEED_SHORT_SIDE))
BENCH_MODEL ?= clip-b32
WORKERS ?= $(NPROC)
BATCH ?=
STEPS ?=
ZS_BATCH ?= 256
ZS_BATCHES ?=
ZS_LEVERS ?=
BENCH_OUT ?= results/bench
$(SPEED_DATA)/prepare_report.json:
	test -f $(SPEED_SOURCE)/synthetic_manifest.json || $(PY) data_scripts/make_synthetic.py --output $(SPEED_SOURCE) \
	  --classes $(SPEED_CLASSES) --per-class $(SPEED_PER_CLASS) --size $(SPEED_SIZE) --num-proc $(NPROC)
	$(PY) data_scripts/prepare_kaggle.py --source $(SPEED_SOURCE) --output $(SPEED_DATA) --short-side $(SPEED_SHORT_SIDE) \
	  --num-proc $(NPROC) --no-progress > /dev/null

bench-zero-shot: setup $(SPEED_DATA)/prepare_report.json  ## zero-shot encoding images/s (data vs model only), FLOPs, MFU, peak memory, whole-split time -> results/bench/*.json (ZS_LEVERS=--decode-on-device; ZS_BATCH, ZS_BATCHES, WORKERS, SPEED_*)
	$(OFFLINE) $(PY) -m mushroomclip.evaluation.benchmark speed --data $(SPEED_DATA) --model $(BENCH_MODEL) --batch-size $(ZS_BATCH) \
	  --num-workers $(WORKERS) --output $(BENCH_OUT) $(if $(ZS_BATCHES),--batches $(ZS_BATCHES)) $(ZS_LEVERS)

TOWERS ?= vision,text
bench-train: setup $(SPEED_DATA)/prepare_report.json  ## LoRA training images/s (data, model only, run_clip.py baseline), FLOPs, MFU, peak memory -> results/bench/*.json (TOWERS=vision: frozen text; BENCH_MODEL=resnet-50: supervised; LEVERS="--compile ..."; BATCH, STEPS, WORKERS, SPEED_*)
	$(OFFLINE) $(PY) -m mushroomclip.evaluation.benchmark train-speed --data $(SPEED_DATA) --model $(BENCH_MODEL) --num-workers $(WORKERS) \
	  --towers $(TOWERS) --output $(BENCH_OUT) $(if $(BATCH),--batch-size $(BATCH)) $(if $(STEPS),--steps $(STEPS)) $(LEVERS)

# Every speed figure issues 13 and 14 ask for, in order of importance (each writes its JSON as it finishes, so a
# run cut short keeps what it measured), then the docs table: one command for a session lent a GPU. A lever that
# fails (e.g. torch.compile without a compiler) does not stop the rest; the levers' runs skip the baseline, which
# is the plain run's.
bench-gpu:  ## on a GPU: bench-train (with its profile), bench-zero-shot, bench-train TOWERS=vision and BENCH_MODEL=resnet-50, each lever alone, then bench-table
	$(MAKE) bench-train
	$(MAKE) bench-zero-shot
	$(MAKE) bench-train TOWERS=vision
	$(MAKE) bench-train BENCH_MODEL=resnet-50
	-$(MAKE) bench-zero-shot ZS_LEVERS=--decode-on-device
	-$(MAKE) bench-zero-shot SPEED_SHORT_SIDE=256
	-$(MAKE) bench-train SPEED_SHORT_SIDE=256 LEVERS="--no-baseline"
	-$(MAKE) bench-train LEVERS="--lora-dropout 0"
	-$(MAKE) bench-train BATCH=1024 STEPS=5 WORKERS=3 LEVERS="--no-baseline"
	-$(MAKE) bench-train LEVERS="--bf16-base --no-baseline"
	-$(MAKE) bench-train LEVERS="--fused-adamw --no-baseline"
	-$(MAKE) bench-train LEVERS="--compile --no-baseline"
	$(MAKE) bench-table

HIER_DATA ?= $(BENCH)/genus-signal
HIER_SEEDS ?= 5
bench-hierarchy: setup  ## do hierarchical losses lower mistake severity? tiny CLIP x 3 losses x HIER_SEEDS seeds on genus-signal data -> results/hierarchy.json + docs/benchmarks.md table (CPU, ~10 min)
	$(OFFLINE) $(PY) data_scripts/make_synthetic.py --output $(HIER_DATA)/kaggle --classes 12 --per-class 40 --genus-signal --seed 0
	$(OFFLINE) $(PY) data_scripts/prepare_kaggle.py --source $(HIER_DATA)/kaggle --output $(HIER_DATA)/prepared --no-progress
	$(OFFLINE) $(PY) -m mushroomclip.evaluation.benchmark hierarchy --data $(HIER_DATA)/prepared --seeds $(HIER_SEEDS)

bench-table:  ## regenerate the speed table of docs/benchmarks.md from results/bench/*.json (BENCH_OUT=DIR)
	$(PY) -m mushroomclip.evaluation.benchmark table --results $(BENCH_OUT) --readme docs/benchmarks.md

lint: setup  ## ruff lint + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:  ## remove demo outputs and caches (keeps .venv)
	rm -rf $(DEMO) results .pytest_cache .ruff_cache
