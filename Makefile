# One venv for everything; created on first use from nothing but python3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint demo bench bench-quick soak soak-quick install uninstall clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint,s3]'
	touch $(STAMP)

run: $(STAMP)  ## start the service on the real defaults, in the foreground
	$(BIN)/session-watcher run $(ARGS)

test: $(STAMP)  ## the whole suite
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check session_watcher tests bench demo
	$(BIN)/ruff format --check session_watcher tests bench demo
	$(BIN)/mypy

# --- make soak / make soak-quick (as root) ------------------------------------------------
# The real service under load, kill -9, inotify overflow, ENOSPC, churn and attacks at once;
# prints one figures line and fails on any lost, torn or leaked transcript. Knobs:
# SOAK_SECONDS (180), SOAK_USERS (40), SOAK_SEED (printed by every run, to replay one).
# SOAK_TARGET=s3: the store on a real Ceph RGW behind a faulty proxy (tests/soak/soak_s3.py;
# engine restarts replace the full disk); skipped with one line until `--target s3://` exists.
soak: $(STAMP)  ## the full soak (about SOAK_SECONDS + 30 s)
	$(BIN)/python tests/soak/soak.py

soak-quick: $(STAMP)  ## the CI soak, about 30 s
	SOAK_SECONDS=$${SOAK_SECONDS:-30} $(BIN)/python tests/soak/soak.py

# Benchmarks (as root): the peers (issue 4: rsync, lsyncd, inotifywait, installed when
# missing), the Claude Code layout (issue 13), the object store on a Ceph RGW started for
# it against rclone and aws s3 sync (issue 12), the noisy neighbour (issue 14). Trees go
# under $$BENCH_DIR (default /var/tmp) and are removed at the end. bench/results.md has a
# section per group: `python -m bench --only noisy --out bench/results.md` reruns one and
# keeps the others (see `python -m bench --help` for the scenario names).
bench: $(STAMP)  ## full benchmark (about 100 min on 2 cores): prints the report, writes bench/results.md
	$(BIN)/python -m bench --out bench/results.md

bench-quick: $(STAMP)  ## smoke test of the benchmark harness (a few minutes); its figures mean nothing
	$(BIN)/python -m bench --quick

demo: $(STAMP)  ## a sandbox without root: two users, a live session, copies landing, a clean stop
	$(BIN)/python demo/demo.py

clean:
	rm -rf $(VENV) .venv-min .pytest_cache .mypy_cache .ruff_cache *.egg-info

# --- make install / make uninstall (as root) ------------------------------------------
# The service gets its own venv (not .venv, which is the developers' editable one), the
# unit and the env file. Override the paths for a staged or non-standard layout, e.g.
# `make install PREFIX=/srv/session-watcher`; the installed unit is rewritten to match.
PREFIX   ?= /opt/session-watcher
UNITDIR  ?= /etc/systemd/system
ENVFILE  ?= /etc/default/session-watcher
DOCDIR   ?= $(PREFIX)/share/doc/session-watcher

install:  ## venv in $(PREFIX), unit in $(UNITDIR), env file (never overwritten), daemon-reload
	@[ "$$(id -u)" = 0 ] || { echo "make install: run as root (sudo make install)" >&2; exit 1; }
	@case "$(PREFIX)" in /?*) ;; *) echo "make install: PREFIX must be an absolute path" >&2; exit 1;; esac
	[ -x $(PREFIX)/bin/python ] || $(PYTHON) -m venv $(PREFIX)
	# setuptools never prunes build/lib: a stale copy of a deleted module would be installed.
	rm -rf build
	$(PREFIX)/bin/python -m pip install --quiet --upgrade '.[s3]'
	rm -rf build
	[ ! -e README.md ] || install -D -m 0644 README.md $(DOCDIR)/README.md
	install -d $(UNITDIR)
	sed -e 's#/opt/session-watcher#$(PREFIX)#g' \
	    -e 's#/etc/default/session-watcher#$(ENVFILE)#g' \
	    deploy/session-watcher.service > $(UNITDIR)/.session-watcher.service.tmp
	chmod 0644 $(UNITDIR)/.session-watcher.service.tmp
	mv -f $(UNITDIR)/.session-watcher.service.tmp $(UNITDIR)/session-watcher.service
	@if [ -e $(ENVFILE) ]; then \
	    echo "keeping existing $(ENVFILE) (new defaults: deploy/session-watcher.env)"; \
	else \
	    install -D -m 0644 deploy/session-watcher.env $(ENVFILE) && echo "installed $(ENVFILE)"; \
	fi
	@if [ -d /run/systemd/system ]; then \
	    echo "systemctl daemon-reload"; systemctl daemon-reload; \
	    echo "next: systemctl enable --now session-watcher  (after disabling session-collector.timer)"; \
	    if systemctl -q is-active session-watcher; then \
	        echo "session-watcher is running the old code: systemctl restart session-watcher"; fi; \
	else \
	    echo "systemd is not running here (no /run/systemd/system): skipped systemctl daemon-reload"; \
	fi

uninstall:  ## remove venv and unit; keeps $(ENVFILE) unless PURGE=1, never touches the store
	@[ "$$(id -u)" = 0 ] || { echo "make uninstall: run as root" >&2; exit 1; }
	@case "$(PREFIX)" in /?*) ;; *) echo "make uninstall: PREFIX must be an absolute path" >&2; exit 1;; esac
	# The unit keeps its runtime directory (the state file) after a stop; not after this.
	@if [ -d /run/systemd/system ]; then systemctl disable --now session-watcher 2>/dev/null || true; \
	    systemctl clean --what=runtime session-watcher 2>/dev/null || true; fi
	rm -f $(UNITDIR)/session-watcher.service
	rm -rf $(PREFIX)
	@if [ "$(PURGE)" = 1 ]; then rm -f $(ENVFILE); echo "removed $(ENVFILE)"; \
	else echo "kept $(ENVFILE) (make uninstall PURGE=1 removes it)"; fi
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	else echo "systemd is not running here: skipped systemctl daemon-reload"; fi
