"""The user's code that builds a model from an installed zoo."""

import tinyzoo


def build():
    return tinyzoo.create_model("tiny", width=16)


INPUT_SHAPE = (2, 3, 8, 8)
