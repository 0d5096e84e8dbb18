# Lambda packaging, included by the root Makefile (`include build/lambda.mk`).
#
# `make build` runs `sam build` offline: every function in template.yaml has
# `BuildMethod: makefile` with the root Makefile as ContextPath and the repository
# root as WorkingDirectory, so SAM calls `make build-<LogicalId>` here with
# ARTIFACTS_DIR set. Each target ships `src/pgsnow`, the function's `app.py` and the
# function's own requirements, resolved for the Lambda platform (cp312, manylinux
# x86_64, wheels only), so it works on any build host without Docker.

# The repository root, from this file's own location: correct whatever the cwd is.
LAMBDA_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)

PYTHON ?= python3
TOOLS ?= .venv-tools
TOOLS_BIN := $(LAMBDA_ROOT)/$(TOOLS)/bin
SAM_CLI_REQUIREMENT ?= aws-sam-cli==1.170.0
SAM := $(TOOLS_BIN)/sam
# checkov pins many libraries of its own: it gets a virtualenv inside the tools folder.
CHECKOV_REQUIREMENT ?= checkov==3.3.30
CHECKOV_VENV := $(LAMBDA_ROOT)/$(TOOLS)/checkov
CHECKOV := $(CHECKOV_VENV)/bin/checkov
# sam validate/build need a region but no credentials; telemetry off keeps it offline.
AWS_REGION ?= us-east-1
SAM_ENV := SAM_CLI_TELEMETRY=0 AWS_DEFAULT_REGION=$(AWS_REGION) AWS_REGION=$(AWS_REGION)
SAM_BUILD_DIR ?= .aws-sam/build
LAMBDA_FUNCTIONS := ExtractorFunction LoaderFunction CleanupFunction ChangeCaptureFunction

LAMBDA_PYTHON_VERSION := 3.12
LAMBDA_PLATFORM := manylinux2014_x86_64
LAMBDA_SIZE_LIMIT_MB ?= 250
# pip that resolves for the Lambda platform: the tools venv's, else the host Python's.
LAMBDA_PIP ?= $(firstword $(wildcard $(TOOLS_BIN)/python) $(PYTHON)) -m pip
# Parts of the package only the local stack and CLI use (moto/fakesnow/pgserver glue).
LAMBDA_PACKAGE_EXCLUDES := pgsnow/local pgsnow/demo
# A Python 3.12 on the build host, if any, to check that each artifact imports on its own.
LAMBDA_SMOKE_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.12 /usr/local/bin/python3.12 \
	$(HOME)/.pyenv/versions/3.12*/bin/python3.12))

# $(1) = function folder (extractor, loader, cleanup)
define build_lambda_artifact
	$(if $(ARTIFACTS_DIR),,$(error ARTIFACTS_DIR is not set: run `make build` (sam build) instead))
	@echo "==> $(1): $(1)/requirements.txt for cp$(subst .,,$(LAMBDA_PYTHON_VERSION)) $(LAMBDA_PLATFORM) -> $(ARTIFACTS_DIR)"
	mkdir -p "$(ARTIFACTS_DIR)"
	$(LAMBDA_PIP) install --quiet --disable-pip-version-check --no-compile \
		--target "$(ARTIFACTS_DIR)" -r "$(LAMBDA_ROOT)/$(1)/requirements.txt" \
		--platform $(LAMBDA_PLATFORM) --implementation cp \
		--python-version $(LAMBDA_PYTHON_VERSION) --only-binary=:all:
	@echo "==> $(1): src/pgsnow and $(1)/app.py"
	tar -C "$(LAMBDA_ROOT)/src" --exclude=__pycache__ --exclude='*.pyc' \
		$(foreach path,$(LAMBDA_PACKAGE_EXCLUDES),--exclude=$(path)) -cf - pgsnow \
		| tar -C "$(ARTIFACTS_DIR)" -xf -
	cp "$(LAMBDA_ROOT)/$(1)/app.py" "$(ARTIFACTS_DIR)/app.py"
	@# Nothing at run time reads these: console scripts, test suites, C headers, Cython sources.
	rm -rf "$(ARTIFACTS_DIR)/bin" "$(ARTIFACTS_DIR)/pyarrow/tests" "$(ARTIFACTS_DIR)/pyarrow/include"
	find "$(ARTIFACTS_DIR)" -depth \( -name __pycache__ -o -name '*.pyx' -o -name '*.pxd' \) \
		-exec rm -rf {} +
endef

build-ExtractorFunction:
	$(call build_lambda_artifact,extractor)

build-LoaderFunction:
	$(call build_lambda_artifact,loader)

build-CleanupFunction:
	$(call build_lambda_artifact,cleanup)

# The change-capture function is the extractor's artifact with another handler (template.yaml).
build-ChangeCaptureFunction:
	$(call build_lambda_artifact,extractor)

$(TOOLS_BIN)/sam:
	$(PYTHON) -m venv "$(LAMBDA_ROOT)/$(TOOLS)"
	$(TOOLS_BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(TOOLS_BIN)/pip install --quiet --disable-pip-version-check "$(SAM_CLI_REQUIREMENT)"
	touch $@

$(CHECKOV):
	$(PYTHON) -m venv "$(CHECKOV_VENV)"
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check "$(CHECKOV_REQUIREMENT)"
	touch $@

tools: $(TOOLS_BIN)/sam $(CHECKOV) ## Create .venv-tools with the SAM CLI and checkov (their pins conflict with the project's)

validate: tools ## sam validate --lint, cfn-lint and checkov on template.yaml (offline, no credentials)
	$(SAM_ENV) $(SAM) validate --lint --template-file template.yaml --region $(AWS_REGION)
	$(TOOLS_BIN)/cfn-lint template.yaml
	$(MAKE) --no-print-directory checkov
	@echo "template.yaml: sam validate --lint, cfn-lint and checkov clean"

# --skip-download keeps it offline (no guideline links); every skip in template.yaml carries
# its reason in the resource's Metadata.checkov.skip[].comment.
checkov: $(CHECKOV) ## checkov on template.yaml: zero failed checks or the target fails
	$(CHECKOV) --file template.yaml --framework cloudformation --skip-download --compact --quiet

build: tools ## sam build (offline, no Docker), then report artifact sizes; fails over 250 MB unzipped
	@start=$$(date +%s); \
	$(SAM_ENV) $(SAM) build --template-file template.yaml --build-dir $(SAM_BUILD_DIR) --parallel --language-extensions \
		&& echo "sam build took $$(( $$(date +%s) - start )) s"
	$(TOOLS_BIN)/python scripts/artifact_sizes.py $(SAM_BUILD_DIR) \
		--functions $(LAMBDA_FUNCTIONS) --limit-mb $(LAMBDA_SIZE_LIMIT_MB)
ifneq ($(LAMBDA_SMOKE_PYTHON),)
	@for fn in $(LAMBDA_FUNCTIONS); do \
		echo "==> $$fn: import app with $(LAMBDA_SMOKE_PYTHON) -I -S (artifact only, no site-packages)"; \
		(cd $(SAM_BUILD_DIR)/$$fn && $(LAMBDA_SMOKE_PYTHON) -I -S -c \
			'import sys; sys.path.insert(0, "."); import app; assert callable(app.handler)') || exit 1; \
	done
else
	@echo "no python$(LAMBDA_PYTHON_VERSION) on this host: artifact import check skipped"
endif

.PHONY: tools validate checkov build build-ExtractorFunction build-LoaderFunction build-CleanupFunction \
	build-ChangeCaptureFunction
