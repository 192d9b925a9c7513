"""teacher_kd: a big pretrained teacher labels the devices' unlabeled data (Molo et al. 2024).

``strategy``: the server's side (the teacher, who is asked what); ``device``: the device tasks.
"""
from .strategy import TeacherKD

__all__ = ["TeacherKD"]
