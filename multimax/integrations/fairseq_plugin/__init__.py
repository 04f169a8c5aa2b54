"""fairseq plugin: ``--user-dir multimax/integrations/fairseq_plugin``.

Registers with fairseq's own registries

- models ``multimax_transformer`` and ``multimax_transformer_lm``, and each of fairseq's
  ``transformer`` / ``transformer_lm`` architectures with a ``multimax_`` prefix
  (``multimax_transformer_iwslt_de_en``, ``multimax_transformer_wmt_en_de``,
  ``multimax_transformer_lm_wiki103``, ...), taking ``--attn-normalizer``,
  ``--output-normalizer``, ``--multimax-order``, ``--softmax-temperature``,
  ``--learn-temperature`` and ``--attention-impl`` (``options.py``);
- the criterion ``multimax_label_smoothed_cross_entropy`` (``criterion.py``), which also
  logs the ε-perplexity and the share of zero-probability targets in validation;
- the optimiser ``multimax_adam``: fairseq's ``adam`` without weight decay on the normaliser
  parameters, under every fairseq precision flag (``optim.py``);
- the tasks ``multimax_language_modeling`` and ``multimax_translation``: fairseq's, resumed
  from a checkpoint onto exactly the batches the uninterrupted run reads (``tasks.py``);

and allow-lists the types fairseq checkpoints hold for ``torch.load(weights_only=True)``
(``multimax.integrations.fairseq_checkpoints``), and gives NumPy 2 back the one name fairseq
0.12 still reads, ``np.compat.long`` (``numpy_compat.py``: ``fairseq-eval-lm
--sample-break-mode eos``, the LM hub's ``sample`` / ``score``). fairseq's own models are left
as they are.

fairseq's hub (``TransformerModel.from_pretrained`` ...) imports the plugin when given
``user_dir=USER_DIR``; it never reads the ``user_dir`` a checkpoint records
(docs/fairseq_plugin.md, *Hub*).

fairseq imports a user dir under its folder name (``fairseq_plugin``); the work is done in
the submodules, always imported under their full names, so importing the plugin both ways
(``--user-dir`` and ``import multimax.integrations.fairseq_plugin``) registers everything once.
"""

import torch
from fairseq.distributed import utils as fairseq_distributed_utils

from multimax.integrations.fairseq_checkpoints import (
    allow_fairseq_checkpoints,
    load_fairseq_checkpoint,
)
from multimax.integrations.fairseq_plugin.criterion import (
    MultimaxLabelSmoothedCrossEntropyCriterion,
)
from multimax.integrations.fairseq_plugin.models import (
    ARCHITECTURES,
    MultimaxTransformerLanguageModel,
    MultimaxTransformerModel,
)
from multimax.integrations.fairseq_plugin.numpy_compat import provide_numpy_compat_long
from multimax.integrations.fairseq_plugin.optim import MultimaxAdam
from multimax.integrations.fairseq_plugin.options import MultimaxOptions, normalizer_cli_args
from multimax.integrations.fairseq_plugin.tasks import (
    MultimaxLanguageModelingTask,
    MultimaxTranslationTask,
)

allow_fairseq_checkpoints()
provide_numpy_compat_long()
# what fairseq's resume broadcast to the other ranks pickles besides the checkpoint's types
torch.serialization.add_safe_globals([fairseq_distributed_utils._TensorPlaceholder])

USER_DIR = __path__[0]  # the folder to pass as fairseq's --user-dir

__all__ = [
    "ARCHITECTURES",
    "USER_DIR",
    "MultimaxAdam",
    "MultimaxLabelSmoothedCrossEntropyCriterion",
    "MultimaxLanguageModelingTask",
    "MultimaxOptions",
    "MultimaxTransformerLanguageModel",
    "MultimaxTransformerModel",
    "MultimaxTranslationTask",
    "allow_fairseq_checkpoints",
    "load_fairseq_checkpoint",
    "normalizer_cli_args",
]
