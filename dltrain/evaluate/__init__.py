"""The evaluate role: test metrics and the plots DVC shows.

    stage.py  the evaluate stage: metrics.json, per_class.json, the confusion matrix
    plots.py  the PNGs: confusion matrix, misclassified images, training curves
"""
