"""``python -m tx_server``: serve with settings from ``TX_*`` environment variables."""

from tx_server.hub import BaseModelError
from tx_server.serve import serve

if __name__ == "__main__":
    try:
        serve()
    except BaseModelError as e:  # one line naming the model, not a traceback
        raise SystemExit(f"tx_server: {e}") from None
