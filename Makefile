# The two commands of the README. Both set up .venv/ first (idempotent, ~2-3 minutes on a fresh machine).
.PHONY: setup run test
# glibc allocator settings: this VM faulted freed memory back in slowly, and one MAML meta-step took 85 s instead of
# ~3; these cut minor page faults 25x and made steps ~20% faster (measured on the 2-core CPU VM, torch 2.13).
export MALLOC_MMAP_THRESHOLD_ = 33554432
export MALLOC_TRIM_THRESHOLD_ = 68719476736
export MALLOC_TOP_PAD_ = 268435456

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/metascale run jobs/glyphs-maml.yaml

test: setup
	bash scripts/test.sh
