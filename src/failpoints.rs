//! Test-only pause points, so tests can force an interleaving instead of hoping for it.
//!
//! With the `failpoints` feature (tests only; release builds never enable it), a test arms a
//! point for one item (`arm("read.before_fill", &key)`); the next task that reaches
//! that point for that item stops there until the test releases it. Without the feature,
//! [`pause`] is an empty inline function and costs nothing.
//!
//! Why not the `fail` crate: its `pause` action blocks the OS thread, and an actix worker
//! thread runs many requests, so a paused reader would freeze the writer it races with.

/// Between a reader's Postgres read and its cache fill: the classic cache-aside race window.
pub const BEFORE_FILL: &str = "read.before_fill";

/// Between a read's Redis reply and storing the entry in the near cache: the in-flight race
/// of client-side caching (`cache::near`).
pub const BEFORE_NEAR_STORE: &str = "read.before_near_store";

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn pause(_point: &'static str, _scope: impl FnOnce() -> String) {}

#[cfg(feature = "failpoints")]
pub use armed::{Armed, arm, pause};

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use tokio::sync::{Semaphore, watch};

    struct Point {
        reached: watch::Sender<bool>,
        release: Semaphore,
    }

    fn points() -> &'static Mutex<HashMap<String, Arc<Point>>> {
        static POINTS: OnceLock<Mutex<HashMap<String, Arc<Point>>>> = OnceLock::new();
        POINTS.get_or_init(Default::default)
    }

    /// Stops here if a test armed `point` for `scope`; one arrival per arming.
    pub async fn pause(point: &'static str, scope: impl FnOnce() -> String) {
        let key = format!("{point}/{}", scope());
        let armed = points()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if let Some(point) = armed {
            point.reached.send_replace(true);
            let _ = point.release.acquire().await;
        }
    }

    /// A point armed by a test. Dropping it releases a paused task, so a failing test
    /// never leaves a request hanging.
    pub struct Armed {
        point: Arc<Point>,
        key: String,
    }

    pub fn arm(point: &'static str, scope: &str) -> Armed {
        let key = format!("{point}/{scope}");
        let point = Arc::new(Point {
            reached: watch::channel(false).0,
            release: Semaphore::new(0),
        });
        points()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), point.clone());
        Armed { point, key }
    }

    impl Armed {
        /// Waits until a task stops at the point.
        pub async fn reached(&self) {
            let mut rx = self.point.reached.subscribe();
            let _ = rx.wait_for(|reached| *reached).await;
        }

        /// Lets the paused task go on.
        pub fn release(self) {}
    }

    impl Drop for Armed {
        fn drop(&mut self) {
            points()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.key);
            self.point.release.add_permits(1);
        }
    }
}
