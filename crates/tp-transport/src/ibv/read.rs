//! One-sided RDMA reads, without verbs: how one read of a remote span is split into
//! work requests and how their completions are accounted for.
//!
//! A reader that pulls `len` bytes from a peer's registered memory (cuda_gdr pulls GPU
//! tensors this way) cannot post them as one request: a request moves at most the
//! port's largest message, and a queue pair accepts only a few outstanding reads at a
//! time (its `max_rd_atomic`). [`ReadPlan`] yields the requests to post — consecutive
//! spans of at most `max_message` bytes, never more than `window` outstanding — and
//! checks each completion against what was posted. A reliable-connected queue pair
//! completes requests in the order they were posted, so a completion for anything but
//! the oldest outstanding request (a stale id, a duplicate, one never posted) is a
//! [`ReadError::UnexpectedCompletion`]: the caller stops using the queue pair.
//!
//! Work request ids continue from the `first_id` the caller gives each plan, so ids
//! never repeat on one queue pair and a late completion of an earlier, abandoned plan
//! cannot be mistaken for one of this plan's.

use core::fmt;

/// One RDMA read to post: `len` bytes at `offset` from the start of both spans.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ReadRequest {
    /// Work request id; its completion must carry it.
    pub wr_id: u64,
    /// Offset into the local and the remote span.
    pub offset: u64,
    /// Bytes to read (at most the plan's `max_message`).
    pub len: u32,
}

/// Why a plan cannot be made or went wrong.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ReadError {
    /// `max_message` or `window` was zero: no request could ever be posted.
    NoProgress,
    /// A completion that is not the oldest outstanding request's.
    UnexpectedCompletion {
        /// The id that completed.
        wr_id: u64,
        /// The id expected next (`None`: nothing was outstanding).
        expected: Option<u64>,
    },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoProgress => f.write_str("a read plan needs a non-zero message size and window"),
            Self::UnexpectedCompletion {
                wr_id,
                expected: Some(e),
            } => write!(f, "read completion {wr_id} arrived where {e} was due"),
            Self::UnexpectedCompletion {
                wr_id,
                expected: None,
            } => write!(
                f,
                "read completion {wr_id} arrived with nothing outstanding"
            ),
        }
    }
}

impl std::error::Error for ReadError {}

/// The requests of one read of `len` bytes (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct ReadPlan {
    len: u64,
    max_message: u32,
    window: u32,
    first_id: u64,
    /// Bytes covered by posted requests.
    posted_bytes: u64,
    /// Requests posted and completed, counted from `first_id`.
    posted: u64,
    completed: u64,
}

impl ReadPlan {
    /// A plan for `len` bytes in requests of at most `max_message` bytes, at most
    /// `window` outstanding, with ids from `first_id` on.
    ///
    /// # Errors
    /// [`ReadError::NoProgress`] when `max_message` or `window` is zero.
    pub fn new(len: u64, max_message: u32, window: u32, first_id: u64) -> Result<Self, ReadError> {
        if max_message == 0 || window == 0 {
            return Err(ReadError::NoProgress);
        }
        Ok(Self {
            len,
            max_message,
            window,
            first_id,
            posted_bytes: 0,
            posted: 0,
            completed: 0,
        })
    }

    /// How many requests the whole read takes.
    pub fn requests(&self) -> u64 {
        self.len.div_ceil(u64::from(self.max_message))
    }

    /// The id the next plan on the same queue pair starts from.
    pub fn next_first_id(&self) -> u64 {
        self.first_id.wrapping_add(self.requests())
    }

    /// The next request to post, if the window has room and bytes remain.
    pub fn next_request(&mut self) -> Option<ReadRequest> {
        if self.posted_bytes >= self.len || self.outstanding() >= u64::from(self.window) {
            return None;
        }
        let len = (self.len - self.posted_bytes).min(u64::from(self.max_message));
        let req = ReadRequest {
            wr_id: self.first_id.wrapping_add(self.posted),
            offset: self.posted_bytes,
            // At most `max_message`, a u32.
            len: u32::try_from(len).unwrap_or(self.max_message),
        };
        self.posted_bytes += len;
        self.posted += 1;
        Some(req)
    }

    /// Records the successful completion of request `wr_id`.
    ///
    /// # Errors
    /// [`ReadError::UnexpectedCompletion`] unless `wr_id` is the oldest outstanding
    /// request's; the plan is unchanged then.
    pub fn complete(&mut self, wr_id: u64) -> Result<(), ReadError> {
        let expected =
            (self.completed < self.posted).then(|| self.first_id.wrapping_add(self.completed));
        if expected != Some(wr_id) {
            return Err(ReadError::UnexpectedCompletion { wr_id, expected });
        }
        self.completed += 1;
        Ok(())
    }

    /// Whether `wr_id` belongs to this plan (posted or not yet).
    pub fn owns(&self, wr_id: u64) -> bool {
        wr_id.wrapping_sub(self.first_id) < self.requests()
    }

    /// Requests posted and not completed.
    pub fn outstanding(&self) -> u64 {
        self.posted - self.completed
    }

    /// Whether every byte was read.
    pub fn is_done(&self) -> bool {
        self.posted_bytes >= self.len && self.outstanding() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a plan against an in-order queue pair model that completes up to `burst`
    /// requests whenever it is polled; returns the spans read.
    fn drive(len: u64, max: u32, window: u32, burst: usize) -> Vec<(u64, u32)> {
        let mut plan = ReadPlan::new(len, max, window, 1000).unwrap();
        let mut in_flight = std::collections::VecDeque::new();
        let mut spans = Vec::new();
        while !plan.is_done() {
            while let Some(r) = plan.next_request() {
                assert!(plan.outstanding() <= u64::from(window));
                spans.push((r.offset, r.len));
                in_flight.push_back(r.wr_id);
            }
            for _ in 0..burst {
                let Some(id) = in_flight.pop_front() else {
                    break;
                };
                plan.complete(id).unwrap();
            }
        }
        spans
    }

    #[test]
    fn spans_cover_the_read_once_in_order_within_the_window() {
        for (len, max, window, burst) in [
            (0, 4, 1, 1),
            (1, 4, 1, 1),
            (4, 4, 1, 1),
            (5, 4, 2, 1),
            (1 << 20, 65536, 16, 3),
            ((1 << 20) + 7, 65536, 1, 1),
        ] {
            let spans = drive(len, max, window, burst);
            let mut at = 0;
            for (off, n) in &spans {
                assert_eq!(*off, at);
                assert!(*n > 0 && *n <= max);
                at += u64::from(*n);
            }
            assert_eq!(at, len);
            assert_eq!(spans.len() as u64, len.div_ceil(u64::from(max)));
        }
    }

    #[test]
    fn completions_out_of_order_stale_or_unposted_are_errors() {
        let mut plan = ReadPlan::new(10, 4, 2, 7).unwrap();
        assert_eq!(
            plan.complete(7),
            Err(ReadError::UnexpectedCompletion {
                wr_id: 7,
                expected: None
            })
        );
        let a = plan.next_request().unwrap();
        let b = plan.next_request().unwrap();
        assert!(plan.next_request().is_none(), "window of 2");
        assert_eq!((a.wr_id, b.wr_id), (7, 8));
        assert!(plan.complete(8).is_err(), "8 before 7");
        assert!(plan.complete(6).is_err(), "an earlier plan's id");
        plan.complete(7).unwrap();
        assert!(plan.complete(7).is_err(), "a duplicate");
        let c = plan.next_request().unwrap();
        assert_eq!((c.offset, c.len), (8, 2));
        plan.complete(8).unwrap();
        plan.complete(9).unwrap();
        assert!(plan.is_done());
        assert_eq!(plan.next_first_id(), 10);
        assert!(plan.owns(9) && !plan.owns(10) && !plan.owns(6));
    }

    #[test]
    fn a_plan_that_could_never_progress_is_refused() {
        assert_eq!(
            ReadPlan::new(1, 0, 1, 0).unwrap_err(),
            ReadError::NoProgress
        );
        assert_eq!(
            ReadPlan::new(1, 1, 0, 0).unwrap_err(),
            ReadError::NoProgress
        );
    }

    #[test]
    fn ids_wrap_around_without_confusion() {
        let mut plan = ReadPlan::new(8, 4, 2, u64::MAX).unwrap();
        let a = plan.next_request().unwrap();
        let b = plan.next_request().unwrap();
        assert_eq!((a.wr_id, b.wr_id), (u64::MAX, 0));
        assert!(plan.owns(0) && plan.owns(u64::MAX) && !plan.owns(1));
        plan.complete(u64::MAX).unwrap();
        plan.complete(0).unwrap();
        assert!(plan.is_done());
        assert_eq!(plan.next_first_id(), 1);
    }
}
