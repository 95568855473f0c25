# The two commands of the README. Both set up .venv/ first (idempotent, ~2-3 minutes on a fresh machine).
.PHONY: setup run test
# glibc allocator settings measured in FIELD-NOTES: freed memory faulted back in slowly stalled meta-steps.
export MALLOC_MMAP_THRESHOLD_ = 33554432
export MALLOC_TRIM_THRESHOLD_ = 68719476736
export MALLOC_TOP_PAD_ = 268435456

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/metascale run jobs/glyphs-maml.yaml

test: setup
	bash scripts/test.sh
