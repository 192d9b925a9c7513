"""Teacher KD: a big pretrained teacher labels devices' unlabeled data; students learn from its KD loss alone (Molo et al. 2024).

``strategy``: the server's side (the teacher, who is asked what); ``device``: the device tasks.
"""
from .strategy import TeacherKD

__all__ = ["TeacherKD"]
