"""What the three trainers (segmenter, learners, weight module) share: the one epoch loop
(`.loop.fit`), optimizers and schedules, augmentation, the learning-rate finder and
distributed data parallelism."""
