//! A folder for a unit test under the system's temporary folder, removed when dropped (kept
//! when the test panics, to be looked at).

use std::path::PathBuf;

pub(crate) struct TestDir(PathBuf);

impl TestDir {
    /// `ringmx-{prefix}-{name}-{pid}`, emptied (not created).
    pub(crate) fn new(prefix: &str, name: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!("ringmx-{prefix}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        TestDir(d)
    }
}

impl std::ops::Deref for TestDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
