"""The NSA backends (installed as `ejkernel_nsa.backends`), one subpackage each; the registry
imports them, nothing else names them."""
