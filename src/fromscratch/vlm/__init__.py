"""A small vision–language model: data (easy-VQA, VQA-RAD, our own scenes, COCO captions, VQAv2) and metrics."""
