# VirtNet developer entry points. `make test` is what CI runs (via .ci/run).
CARGO ?= cargo
E2E_TOOLS_BIN ?= /var/cache/virtnet-e2e/bin

.PHONY: test lint unit tools bench image fuzz

## test: formatting, lints, unit tests and the e2e suite on the local cluster harness
## (the e2e suite runs the `virtnet` and plugin binaries, which `cargo test` alone does not build,
## and installs `make image`'s image with helm on real nodes)
test: lint tools image
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test --workspace --locked

## lint: rustfmt check and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## unit: only the tests that need neither root nor the cluster binaries
unit:
	$(CARGO) test --workspace --locked --lib --bins

## tools: build (once, cached by version) the third-party peers the e2e suite runs against
tools:
	bash e2e/tools/install

## image: VirtNet's container image (image/Containerfile) as an OCI archive in target/image,
## built without a container daemon; prints its size. Import with `ctr images import`.
image:
	bash image/build

## bench: performance figures, each reported as a ratio against a baseline measured in the same run
## (the benches run VirtNet's release binaries: a debug build's figures say little about what
## users run)
bench:
	$(CARGO) build --release --workspace --bins --locked
	$(CARGO) bench --workspace --locked

## fuzz: each fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS, one after the other, with the nightly
## toolchain; not part of `make test` (see docs/testing.md). New inputs go to fuzz/target/corpus,
## crashes to fuzz/artifacts.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= cni_config cni_args annotations agent_api prev_result
fuzz:
	cargo_fuzz="$$(bash fuzz/install)" && export PATH="$$(dirname "$$cargo_fuzz"):$$PATH" && \
	cd fuzz && for target in $(FUZZ_TARGETS); do \
		mkdir -p target/corpus/$$target && \
		cargo +nightly fuzz run $$target target/corpus/$$target corpus/$$target -- \
			-max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

# ---- local cluster harness (e2e/src/cluster) ----
.PHONY: e2e sandbox sandbox-down

## e2e: only the end-to-end suite; brings its own cluster up and tears it down (needs root)
e2e: tools image
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test -p virtnet-e2e --test e2e --locked

## sandbox: build VirtNet and its image, bring a cluster of 3 real nodes (kubelet + containerd)
## up, `helm install` VirtNet, apply the sample workloads, leave it running and print its
## KUBECONFIG
sandbox: tools image
	$(CARGO) build --workspace --locked
	bash e2e/tools/sandbox up

## sandbox-down: tear the sandbox down (fine when there is none)
sandbox-down:
	bash e2e/tools/sandbox down
