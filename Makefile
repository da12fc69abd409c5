# contextpilotd: `make run` and `make test` are the two commands to know.
SHELL := /bin/bash
CARGO ?= cargo
DEMO_DIR := target/demo

.PHONY: run test lint fmt bench bench-quick bench-abc bench-quality bench-routing build provision provision-models provision-bench test-tools demo-config clean-cache

## Provision llama-server and the demo model (if needed), build, and run the
## daemon in the foreground on 127.0.0.1:8765.
run: provision build demo-config
	exec target/release/contextpilotd run --config $(DEMO_DIR)/config.toml

## Provision (if needed) and run every test, including the ones that drive a
## real llama-server with a real model: cargo's tests, then the end-to-end
## suite with the official OpenAI Python SDK (its pinned venv is provisioned
## into the cache too).
test: provision-models test-tools
	eval "$$(bash scripts/provision.sh paths)" && \
	  export CONTEXTPILOTD_TEST_LLAMA_SERVER="$$LLAMA_SERVER" CONTEXTPILOTD_TEST_MODEL="$$MODEL" \
	    CONTEXTPILOTD_TEST_GEMMA_MODEL="$$GEMMA_MODEL" CONTEXTPILOTD_TEST_RPC_SERVER="$$RPC_SERVER" && \
	  $(CARGO) test --all-targets --locked && \
	  $(CARGO) build --locked && \
	  PY="$$(bash scripts/python-env.sh | tail -n 1)" && \
	  CONTEXTPILOTD_BIN="$$PWD/target/debug/contextpilotd" "$$PY" -m pytest tests/python -q

## Formatting, clippy on Linux, and clippy for Apple Silicon (the macOS build
## must type-check; the target's standard library is added when missing).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	rustup target list --installed | grep -q '^aarch64-apple-darwin$$' || rustup target add aarch64-apple-darwin
	$(CARGO) clippy --target aarch64-apple-darwin --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Criterion benches of the planning path, then the gateway's added latency
## against llama-server direct and the daemon's memory (real llama-server),
## then the A0/A/B/C comparison (bench/abc): llama-server at its own defaults,
## llama-server with the daemon's flags, ContextPilot's library, contextpilotd,
## on the same requests, then the known-answer quality eval with its
## ablations on both provisioned models (bench/abc/quality.py: 200 questions
## a workload, hours on two cores). Flags for the comparison go in ARGS, for
## the eval in QARGS, e.g.
##   make bench ARGS="--model X.gguf --queries 60 --concurrency 4"
## (--preset gpu for prompts whose prefill a GPU notices).
bench: provision-bench
	$(CARGO) build --release --locked
	eval "$$(bash scripts/provision.sh paths)" && \
	  CONTEXTPILOTD_TEST_LLAMA_SERVER="$$LLAMA_SERVER" CONTEXTPILOTD_TEST_MODEL="$$MODEL" \
	  $(CARGO) bench --locked --bench plan --bench reorder --bench cluster --bench live --bench gateway
	$(MAKE) --no-print-directory bench-abc ARGS="$(ARGS)"
	$(MAKE) --no-print-directory bench-quality QARGS="--ablations $(QARGS)"
	$(MAKE) --no-print-directory bench-routing RARGS="$(RARGS)"

## The A0/A/B/C comparison and the quality eval at small sizes (48 questions
## a workload and model: about half an hour on two cores).
## CONTEXTPILOTD=path uses that daemon binary instead of building target/release.
bench-quick: provision-bench $(if $(CONTEXTPILOTD),,build)
	$(MAKE) --no-print-directory bench-abc ARGS="--quick $(ARGS)"
	$(MAKE) --no-print-directory bench-quality QARGS="--quick $(QARGS)"
	$(MAKE) --no-print-directory bench-routing RARGS="--quick $(RARGS)"

## Known answers: accuracy with its 95 % interval, the paired test against
## plain llama-server, cache reuse and TTFT, per model, workload and system.
bench-quality:
	eval "$$(bash scripts/provision.sh paths)" && \
	  PY="$$(bash scripts/python-env.sh bench/abc/requirements.txt | tail -n 1)" && \
	  "$$PY" bench/abc/quality.py --llama-server "$$LLAMA_SERVER" --model "$$MODEL" --model "$$GEMMA_MODEL" \
	    $(if $(CONTEXTPILOTD),--contextpilotd "$(CONTEXTPILOTD)") $(QARGS)

## Cache-aware routing against round robin over the same fresh backends
## (the daemon's child and plain llama-servers, one slot each): cache share,
## TTFT, requests per second, requests per backend. Flags in RARGS, e.g.
##   make bench-routing RARGS="--quick --cache-ram 0"
bench-routing:
	eval "$$(bash scripts/provision.sh paths)" && \
	  PY="$$(bash scripts/python-env.sh bench/abc/requirements.txt | tail -n 1)" && \
	  "$$PY" bench/abc/routing.py --llama-server "$$LLAMA_SERVER" --model "$$MODEL" \
	    $(if $(CONTEXTPILOTD),--contextpilotd "$(CONTEXTPILOTD)") $(RARGS)

bench-abc:
	eval "$$(bash scripts/provision.sh paths)" && \
	  PY="$$(bash scripts/python-env.sh bench/abc/requirements.txt | tail -n 1)" && \
	  LLAMA_SERVER="$$LLAMA_SERVER" MODEL="$$MODEL" "$$PY" bench/abc/run.py \
	    $(if $(CONTEXTPILOTD),--contextpilotd "$(CONTEXTPILOTD)") $(ARGS)

build:
	$(CARGO) build --release --locked

## systemd-analyze and ruby, which two service tests call (apt, when missing).
test-tools:
	bash scripts/test-tools.sh

provision:
	bash scripts/provision.sh all

## The tests' parts and their second model (Gemma 3 270M: several models by
## name, and the quality eval's second model).
provision-models: provision
	bash scripts/provision.sh gemma

provision-bench: provision-models

demo-config:
	@mkdir -p $(DEMO_DIR)
	@eval "$$(bash scripts/provision.sh paths)" && \
	  printf '# Written by make run: the demo model on the provisioned llama-server.\n[llama]\nbinary = "%s"\nmodel = "%s"\n\n[log]\ndir = "logs"\n' \
	    "$$LLAMA_SERVER" "$$MODEL" > $(DEMO_DIR)/config.toml

clean-cache:
	rm -rf "$${CONTEXTPILOTD_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/contextpilotd}"
