//! The host's page over real HTTP (issue 28's first part; the test in a
//! real browser is still to come): served at `/` and `/dashboard` with a
//! policy that lets it load nothing from elsewhere and no URL of elsewhere
//! in it; its NODES table has the numbers `/state/host` has; a finished
//! allocation appears in the live fragment the page swaps in; its assets
//! are served; a read token guards it.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use steward_devserver::FunctionOptions;

async fn get(steward: &support::AgentProc, path: &str) -> Result<reqwest::Response> {
    let url = format!(
        "{}{path}",
        steward.monitoring_url.as_deref().context("url")?
    );
    Ok(reqwest::get(url).await?)
}

/// The five `data-v` numbers of the NODES row `resource` (total, reserved,
/// distributable, admitted, free).
fn row(html: &str, resource: &str) -> Result<Vec<f64>> {
    let start = html
        .find(&format!("<tr data-resource=\"{resource}\">"))
        .with_context(|| format!("no row {resource}"))?;
    let end = start + html[start..].find("</tr>").context("row end")?;
    html[start..end]
        .split("data-v=\"")
        .skip(1)
        .map(|s| {
            let v = s.split('"').next().unwrap_or_default();
            v.parse::<f64>().with_context(|| format!("{v:?}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_hosts_numbers_and_loads_nothing_from_elsewhere() -> Result<()> {
    let (plane, steward) = support::fake_setup(FunctionOptions::default(), &[]).await?;
    let out = plane.invoke_app("fake", "echo", json!(1)).await?;
    ensure!(out.status == "success", "{out:?}");

    let resp = get(&steward, "/").await?;
    ensure!(resp.status() == 200);
    let policy = resp
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ensure!(policy.contains("default-src 'none'"), "{policy}");
    let html = resp.text().await?;
    ensure!(!html.contains("://"), "a URL of elsewhere in the page");
    // Without a read token there is nothing to log out of, whatever the
    // query says.
    let asked = get(&steward, "/?logout=1").await?.text().await?;
    ensure!(
        !html.contains("/logout") && !asked.contains("/logout"),
        "a logout form without a read token"
    );
    for section in [
        "id=\"load\"",
        "id=\"node-resources\"",
        "id=\"distributable\"",
        "id=\"workers\"",
    ] {
        ensure!(html.contains(section), "no {section}");
    }
    // The same numbers as /state/host.
    let (_, host) = steward.get_json("/state/host").await?;
    let cpu = row(&html, "CPU, cores")?;
    let n = |v: &serde_json::Value| v.as_f64().unwrap_or(-1.0);
    ensure!(
        cpu[0] == n(&host["capacity"]["cpu_count"]),
        "{cpu:?} {host}"
    );
    ensure!(
        cpu[1] == n(&host["reserved"]["cpu_count"]),
        "{cpu:?} {host}"
    );
    ensure!(
        cpu[2] == n(&host["allocatable"]["cpu_count"]),
        "{cpu:?} {host}"
    );
    let admitted = n(&host["workers"]["admitted"]["cpu_ms_per_sec"]) / 1000.0;
    ensure!(cpu[3] == admitted && admitted > 0.0, "{cpu:?} {host}");
    ensure!(cpu[4] == cpu[2] - cpu[3], "{cpu:?}");
    let memory = row(&html, "memory, bytes")?;
    ensure!(
        memory[0] == n(&host["capacity"]["memory_bytes"]),
        "{memory:?}"
    );
    ensure!(
        memory[3] == n(&host["workers"]["admitted"]["memory_bytes"]),
        "{memory:?}"
    );

    // A finished allocation is in the fragment a live page swaps in.
    let out = plane.invoke_app("fake", "echo", json!(2)).await?;
    ensure!(out.status == "success", "{out:?}");
    let (_, allocs) = steward.get_json("/state/allocations").await?;
    let ids: Vec<String> = allocs["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["id"].as_str().map(String::from))
        .collect();
    ensure!(ids.len() == 2, "{allocs}");
    let fragment = get(&steward, "/dashboard?fragment=1").await?.text().await?;
    ensure!(!fragment.contains("<html"), "only the live part");
    for id in &ids {
        ensure!(
            fragment.contains(&format!("data-allocation=\"{id}\"")),
            "{id} missing"
        );
    }
    // The charts get points as the seconds pass.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = get(&steward, "/dashboard?fragment=1&range=hour")
            .await?
            .text()
            .await?;
        if page.contains("data-points=\"") && !page.contains("data-points=\"0\"") {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no chart points within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Today's square of the year's heat map is lit (the activity file's day).
    let (_, activity) = steward.get_json("/state/activity").await?;
    let today = activity["days"]
        .as_array()
        .and_then(|d| d.last())
        .and_then(|d| d["date"].as_str())
        .context("a day of activity")?
        .to_string();
    let page = get(&steward, "/").await?.text().await?;
    let square = page
        .split("<rect ")
        .find(|r| r.contains(&format!("data-date=\"{today}\"")))
        .with_context(|| format!("no square for {today}"))?;
    ensure!(!square.starts_with("class=\"h0\""), "{square}");
    ensure!(square.contains("2 allocations"), "{square}");
    // A chosen range (the export's date form), and a bad one said, escaped.
    let ranged = get(&steward, &format!("/dashboard?since={today}"))
        .await?
        .text()
        .await?;
    let table = ranged
        .split("id=\"usage-range\"")
        .nth(1)
        .context("no table of the chosen range")?;
    ensure!(
        table.contains("data-function=\"default/fake/echo\""),
        "{}",
        table.chars().take(400).collect::<String>()
    );
    let bad = get(&steward, "/dashboard?since=%3Cscript%3E").await?;
    ensure!(bad.status() == 200);
    let bad = bad.text().await?;
    ensure!(
        !bad.contains("<script>") && bad.contains("&lt;script&gt;"),
        "unescaped"
    );
    // This month's usage by application.
    let apps = page
        .split("id=\"usage-month-apps\"")
        .nth(1)
        .context("no table by application")?;
    ensure!(
        apps.contains("data-application=\"default/fake\""),
        "{}",
        apps.chars().take(400).collect::<String>()
    );
    // Its own assets, and nothing else under /assets.
    let js = get(&steward, "/assets/page.js").await?;
    ensure!(js.status() == 200);
    ensure!(
        !js.text().await?.contains("://"),
        "the script names no other place"
    );
    ensure!(get(&steward, "/assets/other.js").await?.status() == 404);
    // A worker's allocations held now: one running (a function that never ends).
    plane.start_request("fake", "hang", json!("x")).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = get(&steward, "/dashboard?fragment=1").await?.text().await?;
        let workers = page.split("id=\"workers\"").nth(1).unwrap_or_default();
        let workers = workers.split("</section>").next().unwrap_or_default();
        if workers.contains("data-running=\"1\" data-queued=\"0\">1 / 0") {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no worker running the hanging allocation: {}",
            workers.chars().take(400).collect::<String>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    plane.stop().await;
    Ok(())
}

/// With a read token the page answers a browser with a login form; the
/// token, posted once, opens a session cookie that reads the page and the
/// documents until it is logged out; a wrong one is refused. The static
/// assets are the same on every host and stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_guards_the_page() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("state-token");
    let secret = "a-page-read-token-0123456789";
    support::write_secret(&token, format!("{secret}\n"))?;
    let token = token.to_str().context("path")?;
    let (plane, steward) =
        support::fake_setup(FunctionOptions::default(), &["--state-token-file", token]).await?;
    let base = steward.monitoring_url.clone().context("url")?;
    for path in ["/", "/dashboard"] {
        let resp = get(&steward, path).await?;
        ensure!(resp.status() == 401, "{path} unguarded");
        ensure!(
            resp.headers().get("www-authenticate").is_some(),
            "a 401 says how to authenticate"
        );
        let body = resp.text().await?;
        ensure!(
            body.contains("id=\"login\"") && !body.contains("id=\"live\""),
            "{body}"
        );
    }
    ensure!(get(&steward, "/state/host").await?.status() == 401);
    ensure!(get(&steward, "/assets/page.js").await?.status() == 200);
    let ok = reqwest::Client::new()
        .get(format!("{base}/"))
        .bearer_auth(secret)
        .send()
        .await?;
    ensure!(ok.status() == 200);
    // A browser's login: no redirects followed, cookies by hand.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let login = |token: &str, cookie: &str| {
        client
            .post(format!("{base}/login"))
            .header("cookie", cookie.to_string())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
    };
    // A stranger's bodies: too large, or not a form, are refused unread.
    let huge = client
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", "x".repeat(1 << 20)))
        .send()
        .await?;
    ensure!(
        huge.status() == 413,
        "a 1 MiB login body: {}",
        huge.status()
    );
    let not_a_form = client
        .post(format!("{base}/login"))
        .header("content-type", "application/json")
        .body("{\"token\": 1}")
        .send()
        .await?;
    ensure!(
        not_a_form.status().is_client_error() && not_a_form.headers().get("set-cookie").is_none(),
        "a JSON login body: {}",
        not_a_form.status()
    );
    let wrong = login("not-the-token-at-all", "").await?;
    ensure!(wrong.status() == 403);
    ensure!(wrong.headers().get("set-cookie").is_none());
    let first = login(secret, "").await?;
    ensure!(first.status() == 303, "{}", first.status());
    let cookie = first
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .context("no session cookie")?
        .to_string();
    ensure!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    ensure!(!cookie.contains(secret), "the token itself in the cookie");
    let session = cookie.split(';').next().context("cookie")?.to_string();
    let get_with = |path: &str, session: &str| {
        client
            .get(format!("{base}{path}"))
            .header("cookie", session.to_string())
            .send()
    };
    let with = |path: &str| get_with(path, &session);
    let page = with("/dashboard").await?;
    ensure!(page.status() == 200);
    let page = page.text().await?;
    ensure!(page.contains("id=\"live\""));
    ensure!(
        page.contains("action=\"/logout\""),
        "no way to log out on the page"
    );
    ensure!(with("/state/host").await?.status() == 200);
    // The form, asked for with a live session, sends the browser on.
    ensure!(with("/login").await?.status() == 303);
    // Logging in again gives the old session back.
    let again = login(secret, &session).await?;
    ensure!(again.status() == 303);
    ensure!(
        with("/dashboard").await?.status() == 401,
        "the old session outlived a new login"
    );
    let session = again
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .context("the new session's cookie")?
        .to_string();
    let with = |path: &str| get_with(path, &session);
    ensure!(with("/dashboard").await?.status() == 200);
    let out = client
        .post(format!("{base}/logout"))
        .header("cookie", session.clone())
        .send()
        .await?;
    ensure!(out.status() == 303);
    ensure!(
        with("/dashboard").await?.status() == 401,
        "the session outlived its logout"
    );
    plane.stop().await;
    Ok(())
}

/// GPU use in LOAD: the GPUs' busy share summed (40 % and 60 %: one GPU's
/// worth) and their memory used, from the usage samples of a fake
/// `nvidia-smi` (no GPU here), in `/state/load` and on the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_use_is_charted() -> Result<()> {
    let bin = tempfile::tempdir()?;
    support::fake_nvidia_smi(
        bin.path(),
        &[
            "0, GPU-0a0a0a0a-1111-2222-3333-444444444444, Tesla T4, 15360, 1024, 40",
            "1, GPU-1b1b1b1b-5555-6666-7777-888888888888, Tesla T4, 15360, 2048, 60",
        ],
    )?;
    let path = format!("{}:{}", bin.path().display(), support::path_with_venv());
    let plane = support::Plane::start().await?;
    let steward = support::AgentProc::steward_with_path(
        &plane.grpc,
        plane.blob_dir.path(),
        &["--usage-sample-interval-s", "1"],
        &path,
    )?;
    let (_, load) = steward
        .wait_json("/state/load", Duration::from_secs(30), |_, v| {
            v["points"]
                .as_array()
                .and_then(|p| p.last())
                .is_some_and(|p| p["value"][8].as_f64().unwrap_or(0.0) > 0.0)
        })
        .await?;
    let last = load["points"]
        .as_array()
        .and_then(|p| p.last())
        .context("a point")?;
    ensure!(
        load["fields"][8]["name"] == "gpu_busy",
        "{}",
        load["fields"]
    );
    let busy = last["value"][8].as_f64().unwrap_or(0.0);
    ensure!((busy - 1.0).abs() < 1e-6, "busy {busy} GPUs");
    let memory = last["value"][9].as_f64().unwrap_or(0.0);
    ensure!(memory == 3072.0 * 1048576.0, "GPU memory {memory}");
    let page = get(&steward, "/").await?.text().await?;
    ensure!(
        page.contains("data-field=\"gpu_busy\">busy 1.00 gpus<"),
        "no busy GPUs in the legend"
    );
    ensure!(
        page.contains("aria-label=\"GPU memory\""),
        "no GPU memory chart"
    );
    plane.stop().await;
    Ok(())
}
