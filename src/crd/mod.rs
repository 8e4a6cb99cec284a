//! Custom resources of group `virtnet.io`.
