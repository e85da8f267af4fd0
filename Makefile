# The two commands of the README. Both set up everything on a fresh machine (Python 3.11):
#   make demo   -- venv, demo data (drawn shapes + text -> VQ codes -> IndexedDataset), a short
#                  CPU training run of the tiny model with a loss per step, ending with a checkpoint
#   make test   -- venv, then the whole test suite (what CI runs)
# On CPU machines torch must be the local CPU wheel torch==2.13.0 (TORCH_SPEC); on a GPU cluster
# run `make install TORCH_SPEC=torch EXTRAS=test,mpi,dali,te` instead.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,mpi,dali
DEMO ?= runs/demo
export TORCHDYNAMO_DISABLE := 1

.PHONY: install demo demo-data test clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo-data: $(DEMO)/dataset/demo.idx

$(DEMO)/dataset/demo.idx: | install
	$(PY) tools/make_demo_data.py --output $(DEMO)
	$(PY) tools/tokenize_images.py --input $(DEMO)/images --key-style stem --output $(DEMO)/image_codes --tiny
	$(PY) tools/build_dataset.py --input $(DEMO)/samples.jsonl --tokenizer $(DEMO)/tokenizer \
		--image-codes $(DEMO)/image_codes --num-image-codes 256 --output $(DEMO)/dataset/demo \
		--seq-length 256 --block-size 32

demo: demo-data
	$(VENV)/bin/megatron-uni train recipes/demo/tiny_cpu.yaml

test: install
	$(PY) -m pytest tests -q --timeout=900 -p no:cacheprovider

clean-demo:
	rm -rf $(DEMO)
