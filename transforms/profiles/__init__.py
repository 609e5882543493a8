"""Profiles: Moesif users and companies computed from the traffic, and Segment calls.

* :mod:`.rollup`: per-profile rollups as pure, mergeable accumulators (and their CombineFn);
* :mod:`.traits`: rollups to Moesif user/company upserts and Segment identify/group calls;
* :mod:`.compute`: a bounded run's profiles, as of one time (:class:`ComputeProfiles`);
* :mod:`.stream`: a stream's profile updates per interval of event time, and its Segment
  calls (:class:`UpdateProfilesInStream`, :class:`SegmentCallsInStream`);
* :mod:`.upserts`: ``--format segment`` identify/group calls merged into upserts;
* :mod:`.delivery`: the outputs (:class:`DeliverProfiles`) and their dead letters.

Importing this package imports none of them, so the launcher can read
:data:`~.compute.PROFILE_COUNTERS` cheaply.
"""
