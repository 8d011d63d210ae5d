"""``python -m flythinker``: the same CLI as the ``flythinker`` script.

`accelerate launch ... -m flythinker train ...` starts one such process per device.
"""

import sys

from flythinker.commands.cli import main

sys.exit(main())
