# The two commands of a fresh machine: `make demo` and `make test` (both set themselves up).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= outputs/demo

.PHONY: test demo bench clean-demo

$(VENV)/installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q

# The whole kit on a synthetic NIH-layout dataset, with the embedded defaults (local cache
# file, SQLite study). ImageNet weights when torchvision can fetch them, else random ones.
demo: $(VENV)/installed
	@mkdir -p $(DEMO)
	@[ -f $(DEMO)/data/train_val_list.txt ] || $(PY) -m extract.synthetic --out $(DEMO)/data --patients 250 --size 512
	@[ -f $(DEMO)/weights ] || { if $(PY) -W ignore -c "from extract.encoders import build_encoder; build_encoder('resnet50', weights='pretrained')" >/dev/null 2>&1; \
	  then echo imagenet > $(DEMO)/weights; \
	  else echo none > $(DEMO)/weights; fi; }
	@[ "$$(cat $(DEMO)/weights)" = imagenet ] || echo "demo: ImageNet weights cannot be fetched here, so the demo uses RANDOM backbone weights: the numbers show the pipeline works, not what ResNet50 features can do"
	$(PY) -W ignore::UserWarning -m extract --data-dir $(DEMO)/data --split all --cache $(DEMO)/cache/features.h5 --weights $$(cat $(DEMO)/weights)
	$(PY) -m cache verify $(DEMO)/cache/features.h5
	$(PY) -m heads.train --cache $(DEMO)/cache/features.h5 --out $(DEMO)/runs/head --overwrite --max-epochs 60
	$(PY) -m search --cache $(DEMO)/cache/features.h5 --out $(DEMO)/search --trials 20 --max-epochs 40
	@echo; echo "demo outputs:"; \
	  echo "  dataset      $(DEMO)/data (synthetic NIH layout)"; \
	  echo "  cache        $(DEMO)/cache/features.h5   (python -m cache info $(DEMO)/cache/features.h5)"; \
	  echo "  head run     $(DEMO)/runs/head   (metrics.json, per_class_auc.csv, predictions_*.csv, roc_curves.png, head.pt)"; \
	  echo "  search       $(DEMO)/search   (trials.csv, best_params.json, *.png, best_run/, study.db)"

bench: $(VENV)/installed
	$(PY) -m benchmarks.run_all

clean-demo:
	rm -rf $(DEMO)
