"""Config fragments shipped with the package (``lightning_htrmrl.conf``); compose them with ``--config``."""
