"""``python -m tx_server``: serve with settings from ``TX_*`` environment variables."""

from tx_server.serve import serve

if __name__ == "__main__":
    serve()
