"""Multi-column rows (text field, prompt/response template, chat messages) to training documents.

The public path of :mod:`Ava.data.columns`, where the rendering rules live and are documented.
The code sits inside ``data/`` because every reader calls it, and this module imports ``data``:
never the reverse, so the two form no import cycle (``make test`` checks the contract).
"""

from .data.columns import CHAT_ROLES, row_to_document, validate_template

__all__ = ["CHAT_ROLES", "row_to_document", "validate_template"]
