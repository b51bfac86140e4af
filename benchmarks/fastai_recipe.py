"""fastai's `fine_tune(5)` on an image folder: the peer that suite.py's `fastai` recipe times.

    python benchmarks/fastai_recipe.py --data ../shared/data/hotdog --seed 0 --json out.json

The recipe as a fastai user writes it, with the same pretrained weights as our default
(timm's tf_efficientnet_lite0 from ../shared/weights, loaded by timm through
`pretrained_cfg_overlay`): `Resize(256)` per item, `aug_transforms(size=224)` per batch,
batch 32, `vision_learner(...).fine_tune(5)` (one epoch of the new head on the frozen body,
then five of every layer, fastai's one-cycle schedules), fastai's default loader workers and
threads. Writes each epoch's val accuracy, the best and the final one, to --json.

fastai is a benchmark-only dependency (`pip install fastai`; it is not one of this
project's): without it this script exits with status 3 and a line saying so, which
suite.py reports as a skipped recipe.
"""

import argparse
import json
import os
import sys
import time

STARTED = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(HERE, "..", "..", "shared"))
NO_FASTAI = 3  # exit status: fastai is not installed here


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image folder with train/ and val/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=os.path.join(
        SHARED, "weights", "tf_efficientnet_lite0.in1k.safetensors"))
    parser.add_argument("--epochs", type=int, default=5, help="fine_tune(EPOCHS)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    try:
        from fastai.vision.all import (Callback, ImageDataLoaders, Recorder, Resize,
                                       accuracy, aug_transforms, set_seed, vision_learner)
    except ImportError:
        print("fastai is not installed (pip install fastai): recipe skipped", file=sys.stderr)
        sys.exit(NO_FASTAI)
    set_seed(args.seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(args.data, train="train", valid="val",
                                       item_tfms=Resize(256),
                                       batch_tfms=aug_transforms(size=224), bs=32,
                                       seed=args.seed)
    learn = vision_learner(dls, "tf_efficientnet_lite0", metrics=accuracy,
                           pretrained_cfg_overlay=dict(file=args.weights))
    # fine_tune is two fits (the frozen epoch, then the rest); the recorder keeps the last
    # fit's rows only, so every epoch's accuracy is collected as it ends
    accs = []

    class Accuracies(Callback):
        order = Recorder.order + 1  # after the recorder has the epoch's final record

        def after_epoch(self):
            accs.append(float(self.learn.final_record[-1]))  # [train loss, val loss, acc]

    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(args.epochs, cbs=[Accuracies()])
    result = dict(val_accuracy_by_epoch=accs, best_val_accuracy=max(accs),
                  final_val_accuracy=accs[-1], best_epoch=accs.index(max(accs)),
                  epochs=len(accs), train_samples=len(dls.train_ds),
                  val_samples=len(dls.valid_ds), wall_seconds=round(time.time() - STARTED, 1))
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
