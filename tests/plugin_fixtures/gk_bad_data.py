"""Datasets and weightings that fail: raise, come back empty, or weigh negatively."""

import torch

from guidekit import DatasetSpec, ImageData, WeightingSpec, hookimpl


def raising(split, image_size, seed):
    raise OSError("the data disk is gone")


def empty(split, image_size, seed):
    return ImageData("empty", torch.zeros(0, 1, 8, 8), None, 0)


@hookimpl
def guidekit_datasets():
    return [DatasetSpec("raising", raising), DatasetSpec("empty", empty)]


def weights_raise(schedule):
    raise ZeroDivisionError("division by zero")


@hookimpl
def guidekit_weightings():
    return [
        WeightingSpec("raising", weights_raise),
        WeightingSpec("negative", lambda schedule: -torch.ones(schedule.num_steps)),
    ]
