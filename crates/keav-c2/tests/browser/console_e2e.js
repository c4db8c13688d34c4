// Drives the keav C2 web console in headless Chromium, as an operator would, and prints what
// it saw as one JSON line. tests/c2_e2e.rs starts the fleet, runs this, and checks both this
// report and the server's state.
//
// node console_e2e.js <console url> <operator token> <words of the human join> <group>
//                     <id of the device to revoke>
"use strict";
const { chromium } = require("playwright-core");

const [url, token, words, group, revokeId] = process.argv.slice(2);
const PATIENCE = 20000;

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.KEAV_CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const report = { pageErrors: [], failedRequests: [] };
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(PATIENCE);
    page.on("pageerror", (e) => report.pageErrors.push(e.message));
    page.on("console", (m) => {
      if (m.type() === "error" && !m.text().includes("401")) report.pageErrors.push(m.text());
    });
    page.on("dialog", (d) => {
      report.dialog = d.message();
      d.accept();
    });

    await page.goto(url);
    report.landed = new URL(page.url()).pathname;

    // A wrong token is refused, and the app stays hidden.
    await page.fill("#token", "not-the-token");
    await page.click("#sign-in button");
    await page.waitForFunction(() => document.getElementById("sign-in-error").textContent !== "");
    report.wrongTokenError = await page.textContent("#sign-in-error");
    report.appHiddenAfterWrongToken = await page.isHidden("#app");

    await page.fill("#token", token);
    await page.click("#sign-in button");
    await page.waitForSelector("#app:not([hidden])");
    report.tokenInSession = await page.evaluate(() => sessionStorage.length === 1);

    // Two joins wait: the human one (accepted with the words the device shows) and a simple one.
    await page.waitForFunction(() => document.querySelectorAll("#joins tr").length === 2);
    report.joinMethods = (await page.locator("#joins tr td:nth-child(2)").allTextContents()).sort();
    const human = page.locator("#joins tr", { hasText: "human" });
    await human.locator("input").fill(words);
    await human.locator("button", { hasText: "Accept" }).click();
    await page.waitForFunction(() => document.querySelectorAll("#joins tr").length === 1);
    await page.locator("#joins tr", { hasText: "simple" }).locator("button", { hasText: "Accept" }).click();
    await page.waitForFunction(() => document.querySelectorAll("#joins tr").length === 0);
    await page.waitForFunction(
      () => [...document.querySelectorAll("#devices td.status")].filter((t) => t.textContent === "joined").length === 2,
    );

    // An action with arguments to the group: both devices answer.
    await page.check("input[name=target][value=group]");
    await page.fill("#cmd-target", group);
    await page.selectOption("#cmd-kind", "action");
    await page.fill("#cmd-action", "7");
    await page.fill("#cmd-args", "0a0b");
    await page.click("#command button[type=submit]");
    await page.waitForFunction(
      () => [...document.querySelectorAll("#sent tr td:nth-child(5)")].filter((t) => t.textContent === "answered").length === 2,
      null,
      { timeout: PATIENCE },
    );
    report.responses = await page.locator("#sent tr td:nth-child(6)").allTextContents();

    // A bad hex argument is caught before anything is sent.
    await page.fill("#cmd-args", "0g");
    await page.click("#command button[type=submit]");
    report.badHexError = await page.textContent("#command-error");
    report.sentRowsAfterBadHex = await page.locator("#sent tr").count();

    // Revoke one device (the console asks first).
    const row = page.locator("#devices tr", { hasText: revokeId });
    await row.locator("button", { hasText: "Revoke" }).click();
    await page.waitForFunction(
      (id) => [...document.querySelectorAll("#devices tr")].some(
        (tr) => tr.textContent.includes(id) && tr.querySelector("td.status").textContent === "revoked"),
      revokeId,
    );

    // The event feed shows the human join.
    await page.waitForFunction(
      () => [...document.querySelectorAll("#events li")].some((li) => li.textContent.includes("joined (human)")),
    );
    report.events = await page.locator("#events li").count();

    // Signing out forgets the token.
    await page.click("#sign-out");
    report.tokenInSessionAfterSignOut = await page.evaluate(() => sessionStorage.length);
    report.ok = true;
  } catch (e) {
    report.ok = false;
    report.error = String(e && e.stack ? e.stack : e);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(report));
})();
