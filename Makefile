# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= $(if $(PATCHFLANNEL_DATA),$(PATCHFLANNEL_DATA),../shared/data)
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m patchflannel.demo --data $(DATA) --out demo_out

test: $(STAMP)
	PATCHFLANNEL_DATA=$(DATA) $(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo_out
