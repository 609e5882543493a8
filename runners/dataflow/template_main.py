"""The file the Dataflow Flex Template launcher runs (FLEX_TEMPLATE_PYTHON_PY_FILE).

It is run as a script, so it only hands over to the installed package.
"""

from moesif_beam.runners.dataflow.flex_template import main

if __name__ == "__main__":
    raise SystemExit(main())
