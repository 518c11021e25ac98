# Every target creates the virtual environment first if it is missing; installing is
# idempotent (a second run only checks a stamp file).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
KERNELS := $(VENV)/.kernels-stamp
# checkov in its own venv (pyproject.toml's k8s-lint extra says why)
CHECKOV := .venv-checkov/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DATA_APT := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts libttspico-utils \
	rhvoice rhvoice-english festvox-itapc16k festvox-italp16k festvox-ellpc11k festvox-rablpc16k festvox-don sox \
	wamerican
# MBROLA's British English diphone voice (training data; tests/test_training.py synthesizes with it).
MBROLA_APT := mbrola mbrola-en1
# libttspico-utils (SVOX Pico), rhvoice-english (RHVoice's voices) and mbrola-en1 are in Debian's
# non-free section, mbrola in contrib: on Debian, apt-non-free (scripts/apt-non-free.sh) adds both
# sections when one of them is missing.
# Debian packages the tests drive for real (each checked by the command it provides).
# The precision test synthesizes the demo model's held-out split, so the data recipe's packages too.
# g++ builds server/kernels/native's kernels (without it the server runs torch's kernels: --kernels torch).
# qemu-user runs the server on an emulated AVX2-only CPU (tests/test_emulated_cpu.py, scripts/emulated_cpu.py).
TEST_APT := prometheus prometheus-alertmanager chromium g++ haproxy nginx qemu-user $(DATA_APT) $(MBROLA_APT)
TEST_CMDS := prometheus promtool prometheus-alertmanager amtool chromium g++ haproxy nginx qemu-x86_64 sox espeak-ng flite festival \
	pico2wave RHVoice-test mbrola
# voice data and the word list that the recipe and the tests use (packages that install no command)
VOICE_FILES := /usr/share/festival/voices/italian/pc_diphone /usr/share/festival/voices/spanish/el_diphone \
	/usr/share/festival/voices/english/rab_diphone /usr/share/festival/voices/english/don_diphone \
	/usr/share/mbrola/en1/en1 /usr/share/dict/american-english

.PHONY: help venv demo test test-apt checkov apt-non-free test-fast bench proto demo-data train-demo rebuild-demo eval-demo clean

help:
	@echo "make demo        start the server on the embedded model, stream a sample, print the transcript"
	@echo "make test        run the test suite (what CI runs)"
	@echo "make test-fast   the unit and integration layers only: no root, no apt, no browser"
	@echo "make proto       regenerate the Python stubs from protos/"
	@echo "make bench       capacity benchmark: real-time streams per machine vs the seed loop (< 15 min)"
	@echo "make demo-data   synthesize the demo model's corpus (apt: espeak-ng, flite, festival, pico, rhvoice, mbrola, sox)"
	@echo "make train-demo  train the demo model (CPU, <= 60 min), then export it to models/demo"
	@echo "make rebuild-demo  rebuild the shipped demo weights: every data and training stage in order (hours)"
	@echo "make eval-demo   WER of the demo model through the real server (EVAL_SET=..., EVAL_ARGS=...)"

venv: $(STAMP) $(KERNELS)

# The package installs without build isolation, so that setup.py builds the native kernels against
# the venv's own torch (not a second copy of it); KERNELS rebuilds them when their sources change.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "setuptools>=77" wheel $$(grep -oE '"(torch|ninja)==[^"]+"' pyproject.toml | tr -d '"')
	ASR_BUILD_KERNELS=0 $(VENV)/bin/pip install -q --no-build-isolation -e '.[dev,client,eval,train,data]'
	rm -f $(KERNELS)
	touch $(STAMP)

# server/kernels/native's kernel back ends (setup.py): g++ from apt, then one build at install
$(KERNELS): $(STAMP) setup.py $(wildcard server/kernels/native/*.cpp server/kernels/native/*.h)
	@command -v g++ >/dev/null || ($(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends g++)
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m server.kernels.native --strict
	touch $@

checkov: $(CHECKOV)

$(CHECKOV): pyproject.toml
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install -q $$(grep -oE '"checkov==[^"]+"' pyproject.toml | tr -d '"')
	touch $@

demo: $(STAMP) $(KERNELS)
	$(PY) scripts/demo.py

test: $(STAMP) $(KERNELS) $(CHECKOV) test-apt
	$(PY) -m pytest

test-apt:
	@missing=0; for c in $(TEST_CMDS); do command -v $$c >/dev/null || missing=1; done; \
	for f in $(VOICE_FILES); do [ -e $$f ] || missing=1; done; \
	if [ $$missing = 1 ]; then $(MAKE) -s apt-non-free && $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(TEST_APT); fi

# the unit and integration layers (tests/conftest.py LAYERS) on the kernel path this CPU selects
# (ASR_TEST_KERNELS=active), long tests left out: no root, no apt, no browser
# two pytest-xdist workers (tests/conftest.py gives each its share of the cores for torch's threads)
test-fast: $(STAMP) $(KERNELS)
	ASR_TEST_KERNELS=active $(PY) -m pytest -n 2 -m "(unit or integration) and not slow"

bench: $(STAMP) $(KERNELS)
	$(PY) -m bench.capacity $(BENCH_ARGS)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/asr/v1/asr.proto

apt-non-free:
	@sh scripts/apt-non-free.sh

# re-checked whenever the Makefile changes: a recipe that adds a synthesizer adds its packages here
$(VENV)/.data-apt-stamp: Makefile
	@command -v espeak-ng >/dev/null && command -v flite >/dev/null && command -v festival >/dev/null \
	  && command -v pico2wave >/dev/null && command -v RHVoice-test >/dev/null && command -v sox >/dev/null \
	  && command -v mbrola >/dev/null && (for f in $(VOICE_FILES); do [ -e $$f ] || exit 1; done) \
	  || ($(MAKE) -s apt-non-free && $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DATA_APT) $(MBROLA_APT))
	mkdir -p $(VENV) && touch $@

demo-data: $(STAMP) $(VENV)/.data-apt-stamp
	$(PY) train/make_data.py --out data/demo

EVAL_SET ?= tests/data/demo-heldout/manifest.jsonl
EVAL_ARGS ?= --greedy
eval-demo: $(STAMP) $(KERNELS)
	$(VENV)/bin/asr-eval $(EVAL_SET) --spawn "--model demo --metrics-port -1 $(SERVER_ARGS)" $(EVAL_ARGS)

train-demo: $(STAMP) $(KERNELS)
	$(PY) train/train_demo.py --data data/demo --work-dir data/demo-train
	$(PY) train/train_demo.py --work-dir data/demo-train --export models/demo

# the shipped weights: ten training stages on a growing corpus (models/demo/README.md); resumable
rebuild-demo: $(STAMP) $(KERNELS) $(VENV)/.data-apt-stamp
	$(PY) train/rebuild_demo.py --out models/demo

clean:
	rm -rf $(VENV) .pytest_cache build server/kernels/native/_*.so
