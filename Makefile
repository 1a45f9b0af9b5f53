# Switchyard: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# Where hack/build-control-plane.sh puts etcd, kube-apiserver, kwok, helm, ...
export SWITCHYARD_TOOLS_BIN ?= $(shell hack/build-control-plane.sh --print-bin-dir)

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## Build the test control plane and node (etcd, kube-*, kubelet, kube-proxy, CoreDNS, kwok, helm, grpcurl) from Go modules, cached by version
	hack/build-control-plane.sh

.PHONY: node-runtime
node-runtime: ## Install the real test node's runtime, the image tools and redis-server (containerd, runc, CNI plugins, iptables, buildah, mmdebstrap, redis-server) from Debian, if missing
	hack/install-node-runtime.sh

.PHONY: images
images: node-runtime ## Build the worker, operator and pause images as OCI archives (release binaries; cached by content)
	hack/build-images.sh

.PHONY: build
build: ## Build every crate (CPU)
	$(CARGO) build --workspace --bins

.PHONY: fmt-check
fmt-check: ## Check formatting
	$(CARGO) fmt --all -- --check

.PHONY: clippy
clippy: ## Lint, warnings are errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: model
model: ## Fetch the real trained model the demo and tests serve (SmolLM2-135M-Instruct GGUF, from PyPI), cached
	hack/fetch-model.sh >/dev/null

.PHONY: python-tools
python-tools: ## Install the official openai Python client the HTTP API's tests use (a virtualenv, from PyPI), cached by version
	hack/python-tools.sh >/dev/null

.PHONY: llamacpp
llamacpp: ## Build llama.cpp (CPU) from the llama-cpp-python sdist, the reference engine of the benchmarks, cached by version
	hack/build-llamacpp.sh >/dev/null

.PHONY: test
test: tools node-runtime model python-tools fmt-check clippy ## Everything CI runs: format, lints, unit, control-plane, cluster, gRPC and real-node tests
	@mkdir -p target
	@# The tests start switchyard-operator as a process; `cargo test` does not build other
	@# packages' binaries, so build them first.
	$(CARGO) build --workspace --bins
	@# The real-node tests run the images as pods.
	hack/build-images.sh
	$(CARGO) test --workspace 2>&1 | tee target/test-output.log
	@# cargo's last line is often an empty doc-test run; end with the total instead.
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "make test: %d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' target/test-output.log

.PHONY: fuzz
fuzz: ## The property tests over untrusted input (GGUF/safetensors headers, config.json, worker.json, placement files, API-key files, gRPC requests as messages and as wire bytes, HTTP requests, conversations through chat templates) at FUZZ_CASES cases each (default 20000; make test runs 200-2000)
	PROPTEST_CASES=$${FUZZ_CASES:-20000} $(CARGO) test -p switchyard-worker --test gguf --test corrupt_checkpoints -- corrupt_headers a_changed a_safetensors
	PROPTEST_CASES=$${FUZZ_CASES:-20000} $(CARGO) test -p switchyard-worker --lib -- any_ no_error_quotes_a_key

.PHONY: soak
soak: tools node-runtime ## Mixed legitimate + attack load on the real node for SOAK_MINUTES (default 30): memory growth per worker, TTFT drift, the accounting (docs/benchmarks.md); not in `make test`
	$(CARGO) build --workspace --bins
	hack/build-images.sh
	SWITCHYARD_SOAK_MINUTES=$${SOAK_MINUTES:-30} $(CARGO) test -p switchyard-tests --test real_node -- --ignored soak_ --nocapture

.PHONY: crds
crds: ## Regenerate crds/ from the operator's Rust types (a test fails when they drift)
	$(CARGO) run --quiet -p switchyard-operator -- crd > crds/modeldeployment.yaml

.PHONY: bench
bench: tools ## Operator scale benchmark: 200 ModelDeployments against a real API server (docs/benchmarks.md)
	$(CARGO) build --release -p switchyard-operator
	$(CARGO) bench -p switchyard-tests --bench operator_scale

.PHONY: bench-engine
bench-engine: ## Engine vs Python transformers on a generated 0.5B MoE checkpoint, f32 and bf16 (docs/benchmarks.md)
	hack/bench/engine-vs-transformers.sh

.PHONY: demo
demo: ## Serve SmolLM2-135M-Instruct (a real model) on loopback and ask it a question through the CLI; MODEL=demo: the random MoE on 2 expert shards
	hack/demo.sh

.PHONY: check-cuda
check-cuda: ## Compile the worker's CUDA path without a GPU (NVIDIA toolkit wheels from PyPI): the library built, binary and tests type-checked; not in `make test` (about 40 min cold, see hack/README.md)
	hack/check-cuda.sh

.PHONY: bench-llamacpp
bench-llamacpp: ## Engine vs llama.cpp on SmolLM2's GGUF (Q4_1, Q8_0, F32), prefill and decode at batch 1/8/32, plus the MoE bench model bf16 vs int4 (docs/benchmarks.md)
	hack/bench/engine-vs-llamacpp.sh

.PHONY: bench-serving
bench-serving: ## Our frontend vs llama-server through their OpenAI HTTP APIs on the MoE bench model's GGUF: tokens/s, TTFT, ITL at 1/8/32 in flight (docs/benchmarks.md)
	hack/bench/serving-vs-llamacpp.sh

.PHONY: fixtures
fixtures: ## Regenerate the tiny HF checkpoints + transformers references in worker/tests/fixtures/models (CI never runs this)
	@venv="$${SWITCHYARD_FIXTURES_VENV:-$$HOME/.cache/switchyard/venv-fixtures}"; \
	if [ ! -x "$$venv/bin/python" ]; then \
		"$$(command -v python3.11 || command -v python3)" -m venv "$$venv"; \
	fi; \
	"$$venv/bin/pip" install --quiet --disable-pip-version-check -r hack/fixtures/requirements.txt; \
	"$$venv/bin/python" hack/fixtures/generate.py

.PHONY: bench-placement
bench-placement: ## Expert placement under a skewed router: even spread vs balanced vs balanced + spare slots, 2/4 shards (docs/benchmarks.md)
	bash hack/bench/placement.sh

.PHONY: bench-experts
bench-experts: ## Expert-parallel figures: one MoE layer on 2/4 shards, decode on 2 shards (docs/benchmarks.md)
	hack/bench/expert-parallel.sh

.PHONY: bench-flood
bench-flood: ## The first seconds of a flood and 3x overload with 1 s deadlines, measured with ghz (docs/benchmarks.md)
	hack/bench/flood.sh

.PHONY: bench-admission
bench-admission: ## Admission figures: goodput at 1x/2x/3x the knee with and without admission, a flood (docs/benchmarks.md)
	hack/bench/admission.sh
