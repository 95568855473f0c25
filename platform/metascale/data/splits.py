"""The standard few-shot class splits of benchmarks built from a larger labelled set, kept here as data so that
packing needs no download: CIFAR-FS and FC100 (from CIFAR-100) and CUB-200-2011. mini- and tiered-ImageNet ship
their splits in their own files (CSV splits, per-split pickles) and need nothing here.
"""

from __future__ import annotations

from metascale.data.tasks import Split

# CIFAR-FS (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers"): 64/16/20 CIFAR-100 fine
# classes. Source: the authors' split files (splits/bertinetto/{train,val,test}.txt of the CIFAR-FS download linked
# from github.com/bertinetto/r2d2's README), as transcribed in github.com/ArnoutDevos/maml-cifar-fs get_cifarfs.py
# (cls_name['train'|'valid'|'test']).
CIFAR_FS: dict[Split, tuple[str, ...]] = {
    "train": tuple(
        (
            "train skyscraper turtle raccoon spider orange castle keyboard clock pear girl seal elephant apple "
            "aquarium_fish bus mushroom possum squirrel chair tank plate wolf road mouse boy shrew couch sunflower "
            "tiger caterpillar lion streetcar lawn_mower tulip forest dolphin cockroach bear porcupine bee hamster "
            "lobster bowl can bottle trout snake bridge pine_tree skunk lizard cup kangaroo oak_tree dinosaur rabbit "
            "orchid willow_tree ray palm_tree mountain house cloud"
        ).split()
    ),
    "val": tuple(
        (
            "otter motorcycle television lamp crocodile shark butterfly sea beaver beetle tractor flatfish maple_tree "
            "camel crab cattle"
        ).split()
    ),
    "test": tuple(
        (
            "baby bed bicycle chimpanzee fox leopard man pickup_truck plain poppy rocket rose snail sweet_pepper "
            "table telephone wardrobe whale woman worm"
        ).split()
    ),
}

# CIFAR-100's 20 superclasses, in the order of their labels (`coarse_label_names` in cifar-100-python/meta).
CIFAR100_COARSE = tuple(
    (
        "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
        "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
        "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
        "vehicles_1 vehicles_2"
    ).split()
)

# FC100 (Oreshkin et al. 2018, "TADAM: Task dependent adaptive metric for improved few-shot learning"): 12/4/4
# superclasses, so 60/20/20 fine classes. Source: the authors' code, github.com/ElementAI/TADAM (now ServiceNow/TADAM)
# datasets/create_dataset_cifar100.py, `class_split` (superclass labels).
FC100_COARSE: dict[Split, tuple[int, ...]] = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}


def cub_split(class_id: int) -> Split:
    """CUB-200-2011's split of Chen et al. 2019 ("A Closer Look at Few-shot Classification"; github.com/wyharveychen/
    CloserLookFewShot filelists/CUB/write_CUB_filelist.py): with i the class's position among the sorted class
    folders (`001.Black_footed_Albatross` ... `200.Common_Yellowthroat`, so i = class_id - 1), i % 2 == 0 is train
    (100 classes), i % 4 == 1 val (50), i % 4 == 3 test (50)."""
    i = class_id - 1
    return "train" if i % 2 == 0 else ("val" if i % 4 == 1 else "test")
