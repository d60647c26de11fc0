//! RFC 3339 timestamps in UTC (`2026-11-27T14:50:43.123Z`), computed from the system clock with the
//! days-from-civil algorithm, so no calendar crate is needed.

use std::time::{SystemTime, UNIX_EPOCH};

/// The current time as RFC 3339 UTC with millisecond precision.
///
/// # Examples
/// ```
/// let now = aion_model::time::rfc3339_now();
/// assert!(now.ends_with('Z') && now.len() == 24);
/// ```
pub fn rfc3339_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let ms = d.as_millis() as i64;
    // A source stamps every kanban it emits: format once per millisecond and thread, clone after that.
    thread_local! {
        static LAST: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    LAST.with(|last| match last.try_borrow_mut() {
        Ok(mut l) => {
            if l.0 != ms {
                *l = (ms, rfc3339_from_unix_millis(ms));
            }
            l.1.clone()
        }
        Err(_) => rfc3339_from_unix_millis(ms),
    })
}

/// Milliseconds since the Unix epoch, as RFC 3339 UTC.
///
/// # Examples
/// ```
/// assert_eq!(aion_model::time::rfc3339_from_unix_millis(0), "1970-01-01T00:00:00.000Z");
/// ```
pub fn rfc3339_from_unix_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", sod / 3600, (sod % 3600) / 60, sod % 60)
}

/// Howard Hinnant's civil_from_days: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(rfc3339_from_unix_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_from_unix_millis(1_795_791_043_123), "2026-11-27T14:50:43.123Z");
        assert_eq!(rfc3339_from_unix_millis(-1), "1969-12-31T23:59:59.999Z");
    }
}
