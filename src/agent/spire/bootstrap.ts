import { readFile } from 'node:fs/promises';
import { SpiffeBundle, X509Bundle } from '../../spiffe/bundle.ts';
import type { TrustDomain } from '../../spiffe/id.ts';
import { AgentError, AgentErrorCode } from '../errors.ts';

/**
 * The bootstrap bundle: PEM roots (what `spire-server bundle show` prints) or a SPIFFE bundle (JSON, `-format
 * spiffe`). It only authenticates the server at first contact; the bundle the server sends replaces it.
 */
export async function loadBootstrapBundle(file: string, trustDomain: TrustDomain): Promise<SpiffeBundle> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new AgentError(
      AgentErrorCode.Config,
      `spire.bootstrapBundle ${file}: cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`,
      { cause: err },
    );
  }
  try {
    const bundle = text.trimStart().startsWith('{')
      ? SpiffeBundle.parse(trustDomain, text)
      : new SpiffeBundle(trustDomain, { x509Authorities: X509Bundle.parse(trustDomain, text).authorities });
    if (bundle.x509Authorities.length === 0) throw new Error('it holds no X.509 authority');
    return bundle;
  } catch (err) {
    throw new AgentError(
      AgentErrorCode.Config,
      `spire.bootstrapBundle ${file}: not PEM certificates or a SPIFFE bundle of ${trustDomain.name}: ${(err as Error).message}`,
      { cause: err },
    );
  }
}
