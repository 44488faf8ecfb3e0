# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-tl4 test-slow bench bench-sae gpu-check gpu-check-dry model card sae sae-card clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the CPU build pinned here; the project itself only asks for torch>=2.2
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet "torch>=2.2"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# A second environment with transformer-lens 4 (no HookedTransformer) and without sae-lens (which still
# requires transformer-lens < 4): the bridge engine, detect and the CLI must work there, so that moving to
# transformer-lens 4 is a version bump. Same torch first; mechscope itself without its dependencies.
VENV_TL4 := .venv-tl4
PY_TL4 := $(VENV_TL4)/bin/python
STAMP_TL4 := $(VENV_TL4)/.installed
TL4_DEPS := "transformer-lens>=4.3,<5" "nnsight>=0.5" "transformers>=5.9" tokenizers safetensors "matplotlib>=3.7" \
	"jinja2>=3.1" "markdown-it-py>=3" tqdm numpy "pytest>=7"
TL4_TESTS := tests/test_engine_bridge.py tests/test_compute.py tests/test_hub.py

$(STAMP_TL4): pyproject.toml
	$(PYTHON) -m venv $(VENV_TL4)
	$(PY_TL4) -m pip install --quiet --upgrade pip
	$(PY_TL4) -m pip install --quiet "torch==2.13.0" || $(PY_TL4) -m pip install --quiet "torch>=2.6"
	$(PY_TL4) -m pip install --quiet $(TL4_DEPS)
	$(PY_TL4) -m pip install --quiet --no-deps -e .
	touch $(STAMP_TL4)

test-tl4: $(STAMP_TL4)
	$(PY_TL4) -m pytest -q $(TL4_TESTS)

demo: $(STAMP)
	$(PY) -m mechscope.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) bench/patching.py

# every command on CUDA (float32, bfloat16, split across GPUs, CPU offload) against the CPU float32 run;
# gpu-check-dry: the same comparisons on CPU stand-ins (bench/gpu_check.py)
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

gpu-check-dry: $(STAMP)
	$(PY) bench/gpu_check.py --dry-run

card: $(STAMP)
	$(VENV)/bin/mechscope model-card

model: $(STAMP)
	$(PY) -m mechscope.toy.train

# the SAE shipped for the bundled model (src/mechscope/toy/saes/), then its named features and SAE_CARD.md's numbers.
# Two runs on one machine give byte-identical weights; on another platform (CPU, torch build) the weights differ
# from the shipped ones in every element while the card's claims still hold (SAE_CARD.md; the slow test
# tests/test_sae_card.py::test_every_card_claim_survives_a_retrain retrains with seeds 0 and 1 and checks them).
# --save-to never overwrites an SAE: train into a new folder, then replace the shipped one once training succeeded.
SHIPPED_SAE = src/mechscope/toy/saes/blocks.1.hook_resid_pre
sae: $(STAMP)
	rm -rf runs/shipped-sae
	$(VENV)/bin/mechscope sae-train --hook blocks.1.hook_resid_pre --architecture topk --d-sae 256 --k 8 \
		--training-tokens 1000000 --seed 0 --save-to runs/shipped-sae
	rm -rf $(SHIPPED_SAE) && mv runs/shipped-sae $(SHIPPED_SAE)
	$(PY) -m mechscope.toy.sae_card --write-names

sae-card: $(STAMP)
	$(PY) -m mechscope.toy.sae_card

bench-sae: $(STAMP)
	$(PY) bench/sae.py

clean:
	rm -rf $(VENV) $(VENV_TL4) runs demo_runs
