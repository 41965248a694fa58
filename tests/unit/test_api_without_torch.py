"""The API scales out on machines without torch: importing it must not import torch."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_api_does_not_import_torch() -> None:
    code = (
        "import sys, api, api.app, api.server, api.queue, api.images, common.cli, common.up\n"
        "from api.app import create_app\n"
        "create_app()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_cli_help_for_the_api_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom common.cli import main\n"
        "try:\n    main(['api', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--max-queue-length" in proc.stdout
