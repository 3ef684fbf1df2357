"""modules.shared_state.State (Forge keeps A1111's): the one running job, its progress counters and Interrupt."""

import time


class State:
    skipped = False
    interrupted = False
    job = ""
    job_no = 0
    job_count = 0
    sampling_step = 0
    sampling_steps = 0
    current_image = None
    id_live_preview = 0
    textinfo = None
    time_start = None

    def interrupt(self):
        self.interrupted = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0

    def begin(self, job="(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.current_image = None
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.textinfo = None
        self.job = job

    def end(self):
        self.job = ""
        self.job_count = 0

    def assign_current_image(self, image):
        self.current_image = image
        self.id_live_preview += 1
